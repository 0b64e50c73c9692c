"""The vault survives a power cut after every write of a backup, a forget and a
prune, and the campaign's vault checks catch a vault that breaks its rules.

Small runs: two outcomes per crash point and no second cut (the vault's checks
run once per distinct recovered state, so more outcomes mostly add engine
recoveries, which tests/powerloss/test_powerloss_campaign.py covers).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from statefsd.testing.campaign.runner import Settings, Task, run_task

QUICK = Settings(limit=2, extra=0, second_every=0, fsck_every=0)


def quick_run(workload: str, seed: int, system: str = "engine"):
    result = run_task(Task(workload, seed, replace(QUICK, system=system)))
    assert not result.error, result.error
    return result


@pytest.mark.parametrize("seed", [1, 2])
def test_every_cut_of_two_backups_leaves_the_acknowledged_snapshots_whole_and_a_rerun_reuses_stored_chunks(seed):
    result = quick_run("vault-backup", seed)
    assert result.violations == []
    counts = result.counts
    assert counts["re-runs of init"] >= 1 and counts["re-runs of backup"] > 10
    durable = counts["backup re-runs with objects of the first attempt durable"]
    assert durable > 0 and counts["backup re-runs that stored fewer new bytes"] == durable


def test_every_cut_of_a_forget_and_a_prune_keeps_the_retained_snapshot_and_a_rerun_completes():
    result = quick_run("vault-forget-prune-enc", 1)
    assert result.violations == []
    assert result.counts["re-runs of forget"] >= 1 and result.counts["re-runs of prune"] > 5


def test_a_vault_that_shows_a_snapshot_before_counting_its_root_is_caught():
    result = quick_run("vault-backup", 1, "vault-split-snapshot")
    caught = Counter(inv for _, inv, _ in result.violations)
    assert {14, 15} <= set(caught), dict(caught)


def test_a_snapshot_acknowledged_on_a_lying_disk_and_lost_is_caught_by_the_vault_check_too():
    result = quick_run("vault-backup", 1, "lying-disk")
    caught = Counter(inv for _, inv, _ in result.violations)
    assert {1, 13} <= set(caught), dict(caught)
