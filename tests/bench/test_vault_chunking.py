"""python -m bench.vault_chunking: the chunk-size curve on the backup
bench's data, one row per average size, every figure present."""

import json
import os
import subprocess
import sys

from bench import vault_chunking

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KIB, MIB = 1 << 10, 1 << 20


def test_chunking_curve_reports_every_average_with_its_bounds_and_a_recommendation(tmp_path):
    out = tmp_path / "curve.json"
    run = subprocess.run([sys.executable, "-m", "bench.vault_chunking", "--size", "6", "--dir", str(tmp_path),
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [r["avg"] for r in rows] == [64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1 * MIB, 2 * MIB]
    for r in rows:
        assert r["min"] == r["avg"] // 4 and r["max"] == min(r["avg"] * 4, 8 * MIB - 64 * KIB)
        for field in ("v1_chunks", "v1_stored_bytes", "v2_new_chunks", "v2_new_chunk_bytes", "v2_stored_bytes",
                      "chunk_mb_per_s", "chunk_and_hash_mb_per_s"):
            assert r[field] > 0, (r["avg"], field)
        # Stored bytes carry the padding and the per-object records on top of the data.
        assert r["v1_stored_bytes"] > doc["v1"]["bytes"] + r["v1_unique_chunks"] * vault_chunking.OBJECT_OVERHEAD
        assert r["total_stored_bytes"] == r["v1_stored_bytes"] + r["v2_stored_bytes"]
    assert doc["recommendation"]["avg"] in [r["avg"] for r in rows]
    assert "| 256 KiB | 64 KiB | 1 MiB |" in run.stdout
    assert sorted(os.listdir(tmp_path)) == ["curve.json"]  # the generated tree is removed


def test_a_new_chunk_costs_what_the_vault_stores_for_it_plus_its_records():
    # Padmé keeps ~log2(log2 L) significant low bits: 1,000,000 -> 1,015,808 (E=19, S=5: 14 low bits zeroed);
    # the vault seals 4 + length bytes, padded, with a 24-byte nonce and a 16-byte tag.
    assert vault_chunking.object_bytes(1_000_000 - 4) == 1_015_808 + 40 + vault_chunking.OBJECT_OVERHEAD
    assert vault_chunking.object_bytes(100) == 512 + 40 + vault_chunking.OBJECT_OVERHEAD
    assert vault_chunking.object_bytes(509) == 544 + 40 + vault_chunking.OBJECT_OVERHEAD  # 513: E=9, S=4, 5 bits
