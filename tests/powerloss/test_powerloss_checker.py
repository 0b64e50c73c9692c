"""The checker's verdicts on hand-made states: each invariant it names can fail.

Positions are trace op counts, as in the campaign: a txn acknowledged at
``ack`` is required once the cut follows op ``ack`` or later.
"""

from statefsd.testing.campaign.records import History, WriteIndex
from statefsd.testing.campaign.timeline import DELETED, Timeline, Txn


def txn(txn_id, writes, submit, ack):
    return Txn(txn_id, tuple(writes), submit, ack)


def state(**values):
    return dict(values)


TIMELINE = Timeline({}, [
    txn(1, [("a", b"a1")], 0, 2),
    txn(2, [("a", b"a2"), ("b", b"b2")], 2, 4),
    txn(3, [("b", None)], 4, 6),
])


def test_prefix_states_within_the_acknowledged_and_submitted_bounds_pass():
    assert TIMELINE.bounds(3) == (1, 2)
    assert TIMELINE.check(state(a=b"a1"), 3) == []
    assert TIMELINE.check(state(a=b"a2", b=b"b2"), 3) == []
    assert TIMELINE.check(state(a=b"a2"), 6) == []


def test_losing_an_acknowledged_transaction_violates_invariant_1():
    (v,) = TIMELINE.check(state(a=b"a1"), 4)
    assert v.invariant == 1 and "txn(s) 2 lost" in v.message


def test_a_half_applied_transaction_violates_invariant_2():
    (v,) = TIMELINE.check(state(a=b"a1", b=b"b2"), 3)
    assert v.invariant == 2 and "txn 2 is half applied: 'b' changed but 'a' did not" in v.message


def test_a_value_nobody_wrote_violates_invariant_3():
    (v,) = TIMELINE.check(state(a=b"zz"), 3)
    assert v.invariant == 3 and "no submitted transaction wrote" in v.message


def test_a_transaction_visible_before_it_was_submitted_violates_invariant_3():
    (v,) = TIMELINE.check(state(a=b"a2", b=b"b2"), 2)
    assert v.invariant == 3


def test_deletes_are_part_of_the_prefix_state():
    assert DELETED is None
    assert TIMELINE.states[3] == state(a=b"a2")


def test_a_nonce_written_again_with_other_bytes_after_a_cut_violates_invariant_10():
    from statefsd.storage import format as fmt
    from statefsd.testing.simdev import SimulatedDevice

    def sealed_group(payload: bytes) -> bytes:
        rec = fmt.pack_record(fmt.PAYLOAD, flags=fmt.FLAG_SEALED, epoch=1, group=1, seq=0, mount_gen=1,
                              txn_id=7, payload=payload)
        return rec + bytes(fmt.align_up(len(rec)) - len(rec))

    before, after = SimulatedDevice(1 << 20), SimulatedDevice(1 << 20)
    before.write(8192, sealed_group(b"x" * 40))
    after.write(8192, sealed_group(b"y" * 40))
    history = History().then(WriteIndex.of(before.trace, bytes(32)), 1, "workload")
    assert [v.invariant for v in history.check(WriteIndex.of(after.trace, bytes(32)))] == [10]
    # the same bytes again (a verbatim copy) reuse nothing
    again = SimulatedDevice(1 << 20)
    again.write(8192, sealed_group(b"x" * 40))
    assert history.check(WriteIndex.of(again.trace, bytes(32))) == []
    # a write issued only after the cut never happened in this timeline
    late = History().then(WriteIndex.of(before.trace, bytes(32)), 0, "workload")
    assert late.check(WriteIndex.of(after.trace, bytes(32))) == []
