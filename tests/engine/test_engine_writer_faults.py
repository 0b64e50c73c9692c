"""A commit leader that meets a defect (not a device error) while building
its group fails that group's commits instead of leaving them waiting, and a
process forked after large commits can still commit large groups."""

from __future__ import annotations

import os
import threading

from statefsd.errors import InternalError, ReadOnly
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine, Mutation

from tests.engine.conftest import Image


def test_a_multidimensional_read_only_view_is_copied_as_its_bytes_not_taken_as_it_is(tmp_path):
    img = Image(tmp_path / "views.img", 16 << 20)
    with img.mount() as engine:
        engine.put("grid", memoryview(bytes(range(6))).cast("B", (2, 3)).toreadonly())
        assert engine.get("grid") == bytes(range(6))


class _DefectiveDevice(FileDevice):
    """A device whose driver has a bug: once armed, a write raises a plain
    ValueError (not an OSError the engine knows as an I/O failure)."""

    armed = False

    def write(self, offset, data):
        if self.armed:
            raise ValueError("driver defect")
        super().write(offset, data)

    def write_durable(self, offset, data):
        if self.armed:
            raise ValueError("driver defect")
        super().write_durable(offset, data)


def test_every_commit_of_a_group_whose_write_fails_unexpectedly_is_answered_and_none_waits_forever(tmp_path):
    img = Image(tmp_path / "defect.img", 16 << 20)
    device = _DefectiveDevice(img.path)
    engine = Engine.mount(device)
    engine.put("before", b"kept")
    device.armed = True
    results: list = []

    def commit(i: int) -> None:
        try:
            results.append(engine.commit([Mutation("put", f"k/{i}", b"v")]))
        except Exception as exc:   # noqa: BLE001 - the test looks at what came back
            results.append(exc)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a commit is still waiting"
    # The group that met the defect fails as EINTERNAL; the engine then stops
    # writing (C8), so a commit that came later is refused as read-only.
    assert len(results) == 6 and all(isinstance(r, (InternalError, ReadOnly)) for r in results), results
    assert any(isinstance(r, InternalError) for r in results), results
    assert engine.read_only and engine.get("before") == b"kept"
    engine.close()
    with img.mount() as again:
        assert again.list() == ["before"]


def test_a_child_forked_after_large_commits_commits_large_groups_too(tmp_path):
    img = Image(tmp_path / "fork.img", 64 << 20)
    with img.mount() as engine:
        engine.put("big/parent", os.urandom(1 << 20))      # starts the writer's helper threads
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with img.mount() as child:
                done = threading.Event()
                threading.Thread(target=lambda: (child.put("big/child", os.urandom(1 << 20)), done.set()),
                                 daemon=True).start()
                code = 0 if done.wait(30) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with img.mount() as engine:
        assert len(engine.get("big/child")) == 1 << 20
