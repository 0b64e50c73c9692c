"""Forged 64-bit counters: fsck reports them as unrepairable errors, and
(reproducers for the engine) a read-write mount must refuse them with a
StateFSError instead of crashing in the superblock encoder.

Engine.mount validates these counters (engine.counters_problem); these tests
were written as reproducers when fsck's robustness work found the crash.
"""

from __future__ import annotations

import pytest

from statefsd.storage import format as fmt
from statefsd.errors import StateFSError

from fsck_images import forge_superblock as _forge_superblock, append_group, digest, make_image, mount, put_each
from fsck_statefs.cli import run

TOP = (1 << 64) - 1


def _forged(tmp_path, how: str) -> str:
    path = make_image(tmp_path / "forged.img")
    put_each(path, {"a": b"1"})
    if how == "txn_reserved":
        _forge_superblock(path, txn_reserved=TOP)
    elif how == "generation":
        _forge_superblock(path, generation=TOP)
    elif how == "record txn_id":
        append_group(path, fmt.ABORT, txn_id=TOP, payload=b"", group_end=True)
    elif how == "record mount_gen":
        append_group(path, fmt.ABORT, txn_id=50, payload=b"", group_end=True, mount_gen=TOP)
    return path


FORGERIES = ["txn_reserved", "generation", "record txn_id", "record mount_gen"]


@pytest.mark.parametrize("how", FORGERIES)
def test_counter_at_the_end_of_its_range_is_an_unrepairable_error(tmp_path, how):
    path = _forged(tmp_path, how)
    report = run(path)
    assert report.exit_code == 4
    assert any(i.kind == "counter-limit" for i in report.errors), report.to_text()
    before = digest(path)
    repaired = run(path, repair_image=True)
    assert repaired.exit_code == 4 and repaired.repair["blocked"]
    assert digest(path) == before



@pytest.mark.parametrize("how", FORGERIES)
def test_engine_refuses_a_forged_counter_with_a_statefs_error(tmp_path, how):
    path = _forged(tmp_path, how)
    try:
        with mount(path) as e:
            e.put("b", b"2")
    except StateFSError:
        pass
