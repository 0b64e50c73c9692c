"""Random operation sequences with power cuts at random points, against a dict model.

Hypothesis drives the engine on a simulated device with the most adversarial
crash model. A power cut picks any point of the trace since the last mount
(between two writes, between a write and its flush) since the last cut and any outcome of the
writes then unflushed. After recovery: every acknowledged transaction is
there (1), and the one transaction in flight at the cut, if any, is there
whole or not at all (2). Work then continues on the recovered image.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from statefsd.testing.campaign.systems import System, format_image
from statefsd.testing.campaign.variants import LyingDiskSystem
from statefsd.storage.engine import Mutation
from statefsd.errors import NoSpace, StateFSError
from statefsd.testing.simdev import CrashModel

KEYS = st.sampled_from(["a", "b", "c", "dir/d", "dir/e"])
SIZES = st.sampled_from([0, 1, 100, 600, 5000, 70_000])


class PowerLoss(RuleBasedStateMachine):
    system_class = System

    @initialize(encrypted=st.booleans())
    def format(self, encrypted):
        self.system = self.system_class()
        self.device = format_image(f"hypothesis/{encrypted}", encryption=encrypted, model=CrashModel())
        self.engine = self.system.mount(self.device)
        self.model: dict[str, bytes] = {}
        # (state before, state after, submit op, ack op) of each commit since the last mount
        self.history: list[tuple[dict, dict, int, int]] = []
        self.serial = 0

    def value(self, size: int) -> bytes:
        self.serial += 1
        return (f"v{self.serial}:".encode() + bytes(size))[:max(size, len(str(self.serial)) + 2)]

    def commit(self, mutations: list[Mutation]) -> None:
        before, submit = dict(self.model), len(self.device.trace)
        try:
            self.engine.commit(mutations)
        except NoSpace:
            return
        for m in mutations:
            if m.kind == "put":
                self.model[m.path] = m.value
            else:
                self.model.pop(m.path, None)
        self.history.append((before, dict(self.model), submit, len(self.device.trace)))

    @rule(path=KEYS, size=SIZES)
    def put(self, path, size):
        self.commit([Mutation("put", path, self.value(size))])

    @rule(ops=st.lists(st.tuples(KEYS, st.booleans(), SIZES), min_size=2, max_size=5))
    def transaction(self, ops):
        self.commit([Mutation("delete", p) if delete else Mutation("put", p, self.value(size))
                     for p, delete, size in ops])

    @rule()
    def remount(self):
        self.engine.close()
        self.engine = self.system.mount(self.device)

    @precondition(lambda self: len(self.device.trace) > 0)
    @rule(data=st.data())
    def power_cut(self, data):
        trace = self.device.trace
        cut = data.draw(st.integers(0, len(trace)), label="cut after op")
        point = next(trace.crash_points(cut, cut))
        outcomes = list(point.outcomes(limit=12, rng=data.draw(st.integers(0, 2**32), label="rng")))
        outcome = data.draw(st.sampled_from(outcomes), label="outcome")
        self.engine.close()

        required, allowed = self.allowed_after(cut)
        self.device = point.device(outcome)
        self.engine = self.system.mount(self.device)
        got = {p: self.engine.get(p) for p in self.engine.list()}
        assert got in allowed, (f"cut after op {cut} ({outcome.encode()}): state {sorted(got)} is neither the "
                                f"acknowledged state {sorted(required)} nor it plus the txn in flight")
        self.model = got
        self.history = []

    def allowed_after(self, cut: int) -> tuple[dict, list[dict]]:
        """The state of every commit acknowledged by op ``cut``, and with the one in flight."""
        required = self.history[0][0] if self.history else dict(self.model)
        allowed = [required]
        for before, after, submit, ack in self.history:
            if ack <= cut:
                required = after
                allowed = [after]
            elif submit < cut:
                allowed = [required, after]
        return required, allowed

    @invariant()
    def engine_serves_the_model(self):
        if hasattr(self, "engine"):
            assert {p: self.engine.get(p) for p in self.engine.list()} == self.model

    def teardown(self):
        if hasattr(self, "engine"):
            self.engine.close()


SETTINGS = settings(max_examples=150, stateful_step_count=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
PowerLoss.TestCase.settings = SETTINGS
test_random_operations_with_power_cuts_match_the_dict_model = PowerLoss.TestCase


class LyingDiskPowerLoss(PowerLoss):
    system_class = LyingDiskSystem


def test_the_model_test_fails_on_a_disk_that_acknowledges_flushes_it_never_did():
    with pytest.raises(BaseException) as caught:
        run_state_machine_as_test(LyingDiskPowerLoss, settings=settings(
            SETTINGS, database=None, phases=[Phase.generate]))
    failures = _leaves(caught.value)
    # a lost acknowledged value, or an image so damaged that mount refuses it
    assert all(isinstance(f, (AssertionError, StateFSError)) for f in failures), failures
    assert any("acknowledged state" in str(f) for f in failures) or failures


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
