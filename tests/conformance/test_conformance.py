"""One conformance suite, three ways in: the engine on the simulated device,
the engine on a real image file, and a real statefsd through its client.
Every backend must behave the same, down to the error codes."""

import os
import shutil

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine, Mutation
from statefsd.errors import InvalidArgument, NotFound, TooBig
from statefsd.testing.simdev import SimulatedDevice
from tests.daemon.harness import Daemon, make_image, short_tempdir

SIZE = 32 << 20


class EngineStore:
    """The engine, remounted from the device's durable bytes on reopen."""

    def __init__(self, open_device):
        self.open_device = open_device
        self.engine = Engine.mount(open_device())

    def __getattr__(self, name):  # put, get, delete, list, stat
        return getattr(self.engine, name)

    def txn(self, ops):
        return self.engine.commit([Mutation(*op) for op in ops])

    def reopen(self):
        self.engine.close()
        self.engine = Engine.mount(self.open_device())

    def close(self):
        self.engine.close()


class SimStore(EngineStore):
    def __init__(self):
        self.device = SimulatedDevice(SIZE, record=False)
        Engine.mkfs(self.device)
        super().__init__(lambda: self.device)

    def reopen(self):
        self.engine.close()
        # a clean shutdown: only what was flushed is on the medium
        self.device = SimulatedDevice.from_image(self.device.durable_image(), record=False)
        self.engine = Engine.mount(self.device)


class FileStore(EngineStore):
    def __init__(self, tmp):
        path = os.path.join(tmp, "conf.img")
        create_image(path, SIZE)
        with FileDevice(path) as dev:
            Engine.mkfs(dev)
        super().__init__(lambda: FileDevice(path))


class ClientStore:
    def __init__(self, tmp):
        self.image = make_image(os.path.join(tmp, "conf.img"), SIZE)
        self.sock = os.path.join(tmp, "s.sock")
        self._start()

    def _start(self):
        self.daemon = Daemon(self.image, self.sock)
        self.client = self.daemon.client()

    def __getattr__(self, name):
        return getattr(self.client, name)

    def txn(self, ops):
        with self.client.transaction() as t:
            for kind, key, *value in ops:
                t.put(key, value[0]) if kind == "put" else t.delete(key)
        return None

    def reopen(self):
        self.client.close()
        assert self.daemon.stop() == 0
        self._start()

    def close(self):
        self.client.close()
        self.daemon.stop()


@pytest.fixture(params=["simdev", "image-file", "statefsd-client"])
def store(request):
    tmp = short_tempdir()
    s = {"simdev": SimStore, "image-file": lambda: FileStore(tmp),
         "statefsd-client": lambda: ClientStore(tmp)}[request.param]()
    yield s
    s.close()
    shutil.rmtree(tmp, ignore_errors=True)


def test_put_then_get_returns_the_exact_bytes(store):
    store.put("a", b"\x00\x01binary\xff")
    assert store.get("a") == b"\x00\x01binary\xff"


def test_overwrite_replaces_the_value(store):
    store.put("a", b"one")
    store.put("a", b"two")
    assert store.get("a") == b"two"


def test_empty_and_large_chunked_values_round_trip(store):
    big = os.urandom(3 * fmt.CHUNK_SIZE + 123)
    store.put("empty", b"")
    store.put("big", big)
    assert store.get("empty") == b""
    assert store.get("big") == big
    assert store.stat("big")["size"] == len(big)


def test_delete_removes_and_a_missing_key_is_enotfound(store):
    store.put("a", b"1")
    store.delete("a")
    with pytest.raises(NotFound):
        store.get("a")
    with pytest.raises(NotFound):
        store.delete("a")
    with pytest.raises(NotFound):
        store.stat("a")


def test_list_by_prefix_is_sorted_and_exact(store):
    for k in ["b/2", "a", "b/1", "bb", "ü/x"]:
        store.put(k, b"v")
    assert store.list() == ["a", "b/1", "b/2", "bb", "ü/x"]
    assert store.list("b/") == ["b/1", "b/2"]
    assert store.list("nothing") == []


def test_a_transaction_applies_every_operation_at_once(store):
    store.put("old", b"x")
    store.txn([("put", "t/1", b"1"), ("put", "t/2", b"2"), ("delete", "old")])
    assert store.list() == ["t/1", "t/2"]


def test_a_transaction_over_the_op_cap_changes_nothing(store):
    store.put("keep", b"k")
    with pytest.raises(TooBig):
        store.txn([("put", f"k{i}", b"v") for i in range(fmt.MAX_TXN_OPS + 1)])
    assert store.list() == ["keep"]


@pytest.mark.parametrize("key,error", [("", InvalidArgument), ("a\x00b", InvalidArgument),
                                       ("k" * (fmt.MAX_KEY_BYTES + 1), TooBig)])
def test_bad_keys_are_refused_with_stable_codes(store, key, error):
    with pytest.raises(error):
        store.put(key, b"v")
    assert store.list() == []


def test_an_oversize_value_is_etoobig(store):
    with pytest.raises(TooBig):
        store.put("big", bytes(fmt.MAX_VALUE_BYTES + 1))


def test_everything_committed_survives_a_restart(store):
    store.put("a", b"1")
    store.txn([("put", "b", b"2"), ("put", "c", os.urandom(100_000))])
    c = store.get("c")
    store.delete("a")
    store.reopen()
    assert store.list() == ["b", "c"]
    assert store.get("c") == c
