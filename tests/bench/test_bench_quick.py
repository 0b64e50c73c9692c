"""scripts/bench --quick: the benchmark harness runs end to end and reports
every figure and ratio. A smoke test of the bench, not a timed test."""

import json
import math
import os
import subprocess

from bench.report import REPLICA_RATIOS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIGURES = ["a_single_client", "b_concurrent_clients", "c_100_puts_per_txn", "d_bulk_1mib",
           "e_mount", "f_fsck", "g_compaction", "h_memory", "v_vault", "r_replica"]
RATIOS = ["single_client_vs_flush_limit", "single_client_vs_sqlite", "clients16_vs_sqlite",
          "clients16_p99_vs_sqlite", "encrypted_vs_plain_100", "encrypted_vs_plain_4k", "batch100_vs_sqlite",
          "bulk_plain_vs_disk", "bulk_encrypted_vs_disk", "mount_1m_before_compaction_s",
          "mount_1m_vs_1k_after_compaction", "fsck_mb_per_s", "fsck_mb_per_s_100b", "compaction_write_amp",
          "compaction_p99_vs_idle", "redundancy_single_client", "redundancy_bulk", "statefsd_bytes_per_key",
          "vault_first_backup_vs_restic", "vault_second_backup_vs_restic", "vault_stored_vs_restic",
          "vault_restore_vs_restic", "vault_peak_rss_vs_restic"]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_bench_reports_every_figure_and_ratio_with_positive_numbers(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([os.path.join(REPO, "scripts", "bench"), "--quick", "--json", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    figures = doc["figures"]

    assert sorted(figures) == sorted(FIGURES)
    assert set(figures["a_single_client"]) == {"statefs", "statefs_no_redundancy", "sqlite", "lmdb",
                                               "disk_dsync_write"}
    assert set(figures["c_100_puts_per_txn"]) == {"statefs", "sqlite", "lmdb"}
    assert set(figures["b_concurrent_clients"]) == {"statefs", "statefs_encrypted", "sqlite", "lmdb"}
    for key in ("a_single_client", "b_concurrent_clients", "c_100_puts_per_txn"):
        for store, by_size in figures[key].items():
            assert set(by_size) == {"100", "4096"}, (key, store)
            for size, r in by_size.items():
                for field in ("txn_per_s", "puts_per_s", "p50_us", "p99_us"):
                    assert _positive(r[field]), (key, store, size, field, r[field])
    assert figures["b_concurrent_clients"]["statefs"]["100"]["clients"] == 16

    for store in ("statefs", "statefs_encrypted", "statefs_no_redundancy", "disk_write_fsync"):
        assert _positive(figures["d_bulk_1mib"][store]["mb_per_s"]), store
    mount = figures["e_mount"]["histories"]
    assert len(mount) == 2 and mount[0]["txns"] == 1000 and mount[1]["txns"] > 1000
    for row in mount:
        assert _positive(row["mount_before_s"]) and _positive(row["mount_after_s"])
        assert row["replayed_txns"] >= row["txns"]
    g = figures["g_compaction"]
    assert g["compactions"] >= 1
    for field in ("write_amplification", "p99_idle_us", "p99_during_compaction_us"):
        assert _positive(g[field]), field
    assert _positive(figures["h_memory"]["rss_bytes"]) and figures["h_memory"]["keys"] >= 5000
    assert doc["ratios"]["mount_1m_before_compaction_s"] == mount[-1]["mount_before_s"]

    # Replication's ratios have no targets yet: they are reported, not judged.
    assert sorted(doc["ratios"]) == sorted(RATIOS + REPLICA_RATIOS)
    for name in REPLICA_RATIOS:
        assert _positive(doc["ratios"][name]) or figures["r_replica"].get("skipped"), name
    assert sorted(doc["targets"]) == sorted(RATIOS)
    for name in RATIOS:
        value = doc["ratios"][name]
        if name.startswith("fsck_mb_per_s") and value is None:
            assert figures["f_fsck"]["note"], "a missing fsck figure must say why"
            continue
        if name.startswith("vault_") and value is None:
            assert figures["v_vault"]["statefs"]["skipped"], "a missing vault figure must say why"
            continue
        assert _positive(value), (name, value)
        assert doc["targets"][name]["value"] == value
        assert isinstance(doc["targets"][name]["met"], bool), name
