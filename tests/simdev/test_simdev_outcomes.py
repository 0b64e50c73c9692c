"""Power-cut outcomes produce exactly the bytes they describe, models bound
what a cut may do, and enumeration is deterministic and reproducible."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statefsd.storage.blockdev import SECTOR
from statefsd.errors import InvalidArgument
from statefsd.testing.simdev import (DROP, KEEP, CrashModel, Fate, FateKind, Outcome, PendingWrite,
                             SimulatedDevice, enumerate_outcomes, garbage_bytes)

KIB = 1024
SECTORS = 32                       # small devices so properties explore overlaps


def pattern(tag: int, length: int) -> bytes:
    return bytes((tag * 7 + i) % 253 + 1 for i in range(length))


def reference_cut(durable: bytes, pending, outcome: Outcome) -> bytes:
    """The crashed image, sector by sector, straight from the model's definition."""
    image = bytearray(durable)
    order = outcome.order if outcome.order is not None else range(len(pending))
    for i in order:
        offset, data = pending[i].offset, pending[i].data
        fate = outcome.fates[i]
        if fate.kind is FateKind.KEEP:
            image[offset:offset + len(data)] = data
        elif fate.kind is FateKind.GARBAGE:
            image[offset:offset + len(data)] = garbage_bytes(fate.seed, offset, len(data))
        elif fate.kind is FateKind.TORN:
            for s in range(len(data) // SECTOR):
                if fate.mask >> s & 1:
                    image[offset + s * SECTOR:offset + (s + 1) * SECTOR] = data[s * SECTOR:(s + 1) * SECTOR]
            if fate.partial is not None:
                s, n = fate.partial
                image[offset + s * SECTOR:offset + s * SECTOR + n] = data[s * SECTOR:s * SECTOR + n]
    return bytes(image)


def two_pending(first: bytes, second: bytes, *, second_at: int = 0, model=CrashModel()):
    dev = SimulatedDevice(16 * KIB, model=model, chunk_size=KIB)
    dev.write(0, pattern(0, 8 * KIB))
    dev.flush()
    dev.write(0, first)
    dev.write(second_at, second)
    return dev


# -- exact bytes of each fate ------------------------------------------------------------------

def test_dropped_write_leaves_the_durable_bytes():
    dev = two_pending(pattern(1, KIB), pattern(2, KIB), second_at=4 * KIB)
    crashed = dev.power_cut(Outcome((DROP, KEEP)))
    expected = bytearray(pattern(0, 8 * KIB))
    expected[4 * KIB:5 * KIB] = pattern(2, KIB)
    assert crashed.read(0, 8 * KIB) == bytes(expected)


def test_torn_write_lands_exactly_the_masked_sectors():
    dev = SimulatedDevice(8 * KIB)
    dev.write(0, pattern(1, 4 * SECTOR))
    crashed = dev.power_cut(Outcome((Fate.torn(0b1010),)))
    got = crashed.read(0, 4 * SECTOR)
    assert got == bytes(SECTOR) + pattern(1, 4 * SECTOR)[SECTOR:2 * SECTOR] + bytes(SECTOR) \
        + pattern(1, 4 * SECTOR)[3 * SECTOR:]


def test_partial_sector_lands_a_byte_prefix_of_that_sector_only():
    dev = SimulatedDevice(8 * KIB)
    data = pattern(1, 3 * SECTOR)
    dev.write(SECTOR, data)
    crashed = dev.power_cut("P1+1.100")
    assert crashed.read(SECTOR, 3 * SECTOR) == data[:SECTOR + 100] + bytes(2 * SECTOR - 100)
    assert crashed.read(0, SECTOR) == bytes(SECTOR)


def test_garbage_replaces_exactly_the_written_range_and_is_deterministic():
    dev = two_pending(pattern(1, KIB), pattern(2, KIB), second_at=2 * KIB)
    durable = pattern(0, 8 * KIB)
    for seed in (0, 1, 77):
        crashed = dev.power_cut(Outcome((Fate.garbage(seed), DROP)))
        junk = crashed.read(0, KIB)
        assert crashed.read(KIB, 7 * KIB) == durable[KIB:]
        assert junk == garbage_bytes(seed, 0, KIB) == dev.power_cut(Outcome((Fate.garbage(seed), DROP))).read(0, KIB)
        assert junk not in (pattern(1, KIB), durable[:KIB])
    assert garbage_bytes(0, 0, KIB) == bytes(KIB)
    assert garbage_bytes(1, 0, KIB) == b"\xff" * KIB
    assert garbage_bytes(77, 0, KIB) != garbage_bytes(78, 0, KIB) != garbage_bytes(78, KIB, KIB)


def test_reordered_overlapping_writes_let_the_last_landed_win():
    dev = two_pending(pattern(1, KIB), pattern(2, 2 * KIB), second_at=SECTOR)
    in_issue_order = dev.power_cut("KK")
    reordered = dev.power_cut("KK/1,0")
    assert in_issue_order.read(0, 3 * SECTOR) == pattern(1, KIB)[:SECTOR] + pattern(2, 2 * KIB)[:2 * SECTOR]
    assert reordered.read(0, 3 * SECTOR) == pattern(1, KIB) + pattern(2, 2 * KIB)[SECTOR:2 * SECTOR]


def test_dropping_a_later_overlapping_write_exposes_the_earlier_one():
    dev = two_pending(pattern(1, KIB), pattern(2, KIB))
    assert dev.read(0, KIB) == pattern(2, KIB)
    assert dev.power_cut("KD").read(0, KIB) == pattern(1, KIB)
    assert dev.power_cut("DD").read(0, KIB) == pattern(0, 8 * KIB)[:KIB]


# -- properties against the reference -----------------------------------------------------------

ops_strategy = st.lists(
    st.one_of(st.just(("flush",)),
              st.tuples(st.just("write"), st.integers(0, SECTORS - 1), st.integers(1, 6), st.integers(0, 250))),
    min_size=1, max_size=14)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, model_bits=st.integers(0, 31), seed=st.integers(0, 2**32))
def test_power_cut_matches_the_reference_and_never_touches_bytes_outside_pending_ranges(ops, model_bits, seed):
    model = CrashModel(*(bool(model_bits >> i & 1) for i in range(5)))
    dev = SimulatedDevice(SECTORS * SECTOR, model=model, chunk_size=2 * SECTOR)
    durable = bytearray(SECTORS * SECTOR)
    current = bytearray(SECTORS * SECTOR)
    pending = []
    for op in ops:
        if op[0] == "flush":
            dev.flush()
            durable[:] = current
            pending = []
        else:
            _, sector, count, tag = op
            count = min(count, SECTORS - sector)
            data = pattern(tag, count * SECTOR)
            dev.write(sector * SECTOR, data)
            current[sector * SECTOR:(sector + count) * SECTOR] = data
            pending.append(PendingWrite(sector * SECTOR, data))
    assert dev.image() == bytes(current)
    assert dev.durable_image() == bytes(durable)
    touched = set()
    for p in pending:
        touched.update(range(p.offset, p.offset + len(p.data)))
    for outcome in enumerate_outcomes(pending, model, limit=25, rng=seed):
        model.check(outcome, pending)
        crashed = dev.power_cut(outcome)
        image = crashed.image()
        assert image == reference_cut(bytes(durable), pending, outcome), outcome.encode()
        changed = {i for i in range(len(image)) if image[i] != durable[i]}
        assert changed <= touched, outcome.encode()


fate_strategy = st.one_of(
    st.just(KEEP), st.just(DROP),
    st.integers(0, 2**64 - 1).map(Fate.garbage),
    st.integers(0, 2**40).flatmap(lambda mask: st.one_of(
        st.just(Fate.torn(mask)),
        st.tuples(st.integers(0, 45), st.integers(1, SECTOR - 1))
          .filter(lambda p: not mask >> p[0] & 1)
          .map(lambda p: Fate.torn(mask, p)))))


@settings(max_examples=200, deadline=None)
@given(fates=st.lists(fate_strategy, max_size=30), data=st.data())
def test_outcome_encoding_round_trips(fates, data):
    order = data.draw(st.permutations(range(len(fates)))) if fates and data.draw(st.booleans()) else None
    outcome = Outcome(tuple(fates), order)
    code = outcome.encode()
    assert Outcome.decode(code) == outcome
    assert code.isprintable() and " " not in code


def test_outcome_codes_are_short_for_typical_crashes():
    outcome = Outcome((KEEP,) * 40 + (Fate.torn(0b111), Fate.garbage(2)) + (DROP,) * 20)
    assert outcome.encode() == "Kx40P3G2Dx20"
    assert Outcome((KEEP, KEEP, DROP), (1, 0, 2)).encode() == "KKD/1,0,2"
    assert Outcome((), None).encode() == "_"


@pytest.mark.parametrize("code", ["", "Q", "K/0,0", "KK/0", "P3+3", "T1+0.5", "G", "Kx0",
                                  "K+1.5", "P1+1.512", "KD/1-0", "Kx99999999", "G" + "f" * 17])
def test_malformed_outcome_code_is_refused_with_clear_error(code):
    with pytest.raises(InvalidArgument, match="outcome"):
        Outcome.decode(code)


# -- models --------------------------------------------------------------------------------------

def kd(letters: str) -> str:
    """The code of a keep/drop-only outcome written one letter per write."""
    return Outcome(tuple(KEEP if c == "K" else DROP for c in letters)).encode()


def every_keep_drop(n: int) -> set[str]:
    return {kd("".join(c)) for c in itertools.product("KD", repeat=n)}


def mixed_pending():
    return [PendingWrite(0, pattern(1, 3 * SECTOR)), PendingWrite(SECTOR, pattern(2, SECTOR)),
            PendingWrite(4 * KIB, pattern(3, 2 * SECTOR)), PendingWrite(0, pattern(4, SECTOR))]


@pytest.mark.parametrize("limit", [None, 40])
def test_in_order_model_only_yields_prefixes(limit):
    model = CrashModel(in_order=True)
    outcomes = list(enumerate_outcomes(mixed_pending(), model, limit=limit, rng=3))
    assert len(outcomes) > 10
    for outcome in outcomes:
        kinds = [f.kind for f in outcome.fates]
        survivors = len(list(itertools.takewhile(lambda k: k is FateKind.KEEP, kinds)))
        assert all(k is FateKind.DROP for k in kinds[survivors + 1:]), outcome.encode()
        assert outcome.order is None
    assert {o.encode() for o in outcomes} >= {kd("KKKK"), kd("KKKD"), kd("KKDD"), kd("KDDD"), kd("DDDD")}


@pytest.mark.parametrize("limit", [None, 300])
def test_atomic_sectors_model_never_yields_partial_sectors_or_garbage(limit):
    model = CrashModel(atomic_sectors=True)
    outcomes = list(enumerate_outcomes(mixed_pending(), model, limit=limit, rng=5))
    assert any(f.kind is FateKind.TORN for o in outcomes for f in o.fates)
    for outcome in outcomes:
        for fate in outcome.fates:
            assert fate.kind is not FateKind.GARBAGE and fate.partial is None, outcome.encode()


def test_model_without_tearing_or_reordering_only_keeps_or_drops_in_issue_order():
    model = CrashModel.from_spec("none")
    outcomes = list(enumerate_outcomes(mixed_pending(), model))
    codes = [o.encode() for o in outcomes]
    assert len(codes) == 16 and set(codes) == every_keep_drop(4)


def test_models_state_their_effective_flags():
    assert CrashModel(atomic_sectors=True).allow_garbage is False
    assert CrashModel(in_order=True).allow_reorder is False
    for spec in ("none", "atomic_sectors,in_order,tear", "garbage,reorder,tear", "in_order,garbage"):
        model = CrashModel.from_spec(spec)
        assert CrashModel.from_spec(model.spec()) == model
        assert model.spec() in model.describe()
    assert CrashModel().spec() == "garbage,reorder,tear"
    with pytest.raises(InvalidArgument, match="crash model"):
        CrashModel.from_spec("atomic,fast")


# -- enumeration -----------------------------------------------------------------------------------

def test_exhaustive_enumeration_covers_every_allowed_outcome_once():
    pending = mixed_pending()
    outcomes = list(enumerate_outcomes(pending, CrashModel()))
    codes = [o.encode() for o in outcomes]
    assert len(codes) == len(set(codes))
    assert every_keep_drop(4) <= set(codes)
    for outcome in outcomes:
        CrashModel().check(outcome, pending)
    # 3-sector write: every non-trivial sector subset, plus a partial sector after each prefix
    firsts = {o.fates[0].encode() for o in outcomes}
    assert {"P1", "P2", "T2", "T4", "T5", "T6", "P0+0.256", "P1+1.256", "P2+2.256", "G0", "G2"} <= firsts


def test_exhaustive_enumeration_lets_each_overlapping_write_win():
    pending = [PendingWrite(0, pattern(i, SECTOR)) for i in range(3)]
    dev = SimulatedDevice(4 * KIB)
    for p in pending:
        dev.write(p.offset, p.data)
    model = CrashModel.from_spec("reorder")
    winners = {dev.power_cut(o).read(0, SECTOR) for o in enumerate_outcomes(pending, model)
               if all(f is KEEP for f in o.fates)}
    assert winners == {pattern(i, SECTOR) for i in range(3)}


def test_sampled_enumeration_is_deterministic_per_seed_and_distinct():
    pending = [PendingWrite(i * KIB, pattern(i, 2 * SECTOR)) for i in range(12)]
    pending += [PendingWrite(0, pattern(50, 4 * SECTOR))]
    first = [o.encode() for o in enumerate_outcomes(pending, CrashModel(), limit=200, rng=11)]
    again = [o.encode() for o in enumerate_outcomes(pending, CrashModel(), limit=200, rng=random.Random(11))]
    other = [o.encode() for o in enumerate_outcomes(pending, CrashModel(), limit=200, rng=12)]
    assert first == again
    assert first != other
    assert len(first) == 200 == len(set(first))
    assert first[:2] == [Outcome.keep_all(13).encode(), Outcome.drop_all(13).encode()]
    assert any(o.order is not None for o in map(Outcome.decode, first))


def test_enumeration_without_a_limit_refuses_a_huge_space():
    pending = [PendingWrite(i * KIB, pattern(i, 2 * SECTOR)) for i in range(20)]
    with pytest.raises(InvalidArgument, match="pass limit"):
        next(enumerate_outcomes(pending, CrashModel()))


def test_same_seed_and_schedule_reproduce_the_same_crash_state_byte_for_byte():
    def workload(seed: int) -> SimulatedDevice:
        rng = random.Random(seed)
        dev = SimulatedDevice(64 * KIB, chunk_size=4 * KIB)
        for _ in range(40):
            if rng.random() < 0.2:
                dev.flush()
            else:
                dev.write(rng.randrange(120) * SECTOR, rng.randbytes(rng.randrange(1, 8) * SECTOR))
        return dev

    first, second = workload(99).trace, workload(99).trace
    for point in first.crash_points(start=20):
        for outcome in point.outcomes(limit=5, rng=point.index):
            code = outcome.encode()
            reproduced = SimulatedDevice.replay(second, upto=point.index).power_cut(code)
            assert reproduced.image() == point.device(outcome).image(), (point.index, code)
