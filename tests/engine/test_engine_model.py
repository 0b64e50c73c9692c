"""Stateful property test: the engine behaves like a dict, across remounts."""

import tempfile

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine, Mutation

keys = st.sampled_from(["a", "b", "dir/c", "dir/d", "ü/é", "k" * 40])
values = st.one_of(st.binary(max_size=300), st.binary(min_size=65530, max_size=70000))


class EngineMatchesDict(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.path = f"{self.tmp.name}/m.img"
        create_image(self.path, 8 << 20)
        with FileDevice(self.path) as dev:
            Engine.mkfs(dev)
        self.engine = Engine.mount(FileDevice(self.path))
        self.model: dict[str, bytes] = {}
        self.last_txn = 0

    def teardown(self):
        self.engine.close()
        self.tmp.cleanup()

    def _committed(self, txn_id):
        assert txn_id > self.last_txn  # txn ids are monotonic
        self.last_txn = txn_id

    @rule(key=keys, value=values)
    def put(self, key, value):
        self._committed(self.engine.put(key, value))
        self.model[key] = value

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        self._committed(self.engine.delete(key))
        del self.model[key]

    @rule(ops=st.lists(st.tuples(st.booleans(), keys, st.binary(max_size=200)), min_size=1, max_size=6))
    def transaction(self, ops):
        muts = [Mutation("put", k, v) if is_put else Mutation("delete", k) for is_put, k, v in ops]
        self._committed(self.engine.commit(muts))
        for is_put, k, v in ops:
            if is_put:
                self.model[k] = v
            else:
                self.model.pop(k, None)

    @rule(read_only=st.booleans())
    def remount(self, read_only):
        self.engine.close()
        self.engine = Engine.mount(FileDevice(self.path, read_only=read_only), read_only=read_only)
        if read_only:  # come back read-write so the machine can keep writing
            self.engine.close()
            self.engine = Engine.mount(FileDevice(self.path))

    @invariant()
    def same_contents(self):
        assert self.engine.list() == sorted(self.model)
        for k, v in self.model.items():
            assert self.engine.get(k) == v

    @invariant()
    def prefix_listing_matches(self):
        assert self.engine.list("dir/") == sorted(k for k in self.model if k.startswith("dir/"))


# Values up to tens of KiB are the point of the model, so large draws are expected.
EngineMatchesDict.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                               suppress_health_check=[HealthCheck.data_too_large])
test_engine_matches_dict_model = EngineMatchesDict.TestCase
