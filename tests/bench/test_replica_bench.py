"""The replication bench (scripts/bench --only r): StateFS's push, its
upload to an SFTP remote and its copy on a Syncthing peer side by side with
plain rclone copy and Syncthing of the same tree, the lag of one small
change, and a restore from the peer's copy compared key by key."""

import json
import math
import os
import subprocess

import pytest

from bench import replica
from bench.report import REPLICA_RATIOS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIGURES = ["replica_push_mb_per_s", "replica_remote_mb_per_s", "rclone_copy_mb_per_s", "replica_peer_mb_per_s",
           "syncthing_mb_per_s", "replica_lag_s", "syncthing_lag_s", "restore_1gib_from_peer_s",
           *REPLICA_RATIOS]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.skipif(replica.missing() is not None, reason=f"{replica.missing()}")
def test_replication_bench_at_a_tiny_size_reports_every_figure_and_an_equal_restore(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([os.path.join(REPO, "scripts", "bench"), "--quick", "--only", "r", "--replica-mb", "2",
                          "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    r = doc["figures"]["r_replica"]
    assert "error" not in r and "skipped" not in r, r
    assert r["data"]["bytes"] >= 2 << 20 and r["data"]["files"] > 40
    for name in FIGURES:
        assert _positive(r[name]), (name, r.get(name))
    for name in REPLICA_RATIOS:
        assert doc["ratios"][name] == r[name], name
    assert r["versions"]["syncthing"].startswith("v1.") and r["versions"]["rclone"].startswith("rclone v")

    # Every copy was whole: the restore equals the source, key by key.
    assert r["restore"]["equal"] is True
    assert r["restore"]["restored"] == r["restore"]["source"] and r["restore"]["keys"] == r["restore"]["source"]["keys"]
    # The outbox holds at least the data (sealed), and the remote got all of it.
    assert r["push"]["outbox_bytes"] >= r["data"]["bytes"]
    assert r["remote"]["statefs_uploaded_bytes"] == r["push"]["outbox_bytes"]
    assert r["remote"]["statefs_uploaded_files"] == r["push"]["outbox_files"]
    # The peer's copy verified at the head of the first push; every lag run reached the peer.
    assert r["peer"]["copy_head_counter"] == r["push"]["head_counter"] > 0
    assert len(r["lag"]["statefs_s"]) == len(r["lag"]["syncthing_s"]) == 3
    assert all(_positive(x) for x in r["lag"]["statefs_s"] + r["lag"]["syncthing_s"])
    assert "(r) replication of 2 MiB" in run.stdout
