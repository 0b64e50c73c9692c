"""The backup bench (scripts/bench --only v): restic, borg and the StateFS
vault run on the same generated data, every figure is reported, and every
restore is checked byte for byte against the source."""

import json
import math
import os
import shutil
import subprocess

import pytest

from bench import vault_data
from bench.report import VAULT_RATIOS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIGURES = ["first_backup_s", "first_backup_mb_per_s", "second_backup_s", "stored_bytes", "restore_s",
           "restore_mb_per_s", "peak_rss_bytes"]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.skipif(not (shutil.which("restic") and shutil.which("borg")),
                    reason="needs restic and borg (scripts/setup installs them)")
def test_vault_bench_at_a_tiny_size_reports_every_figure_and_byte_identical_restores(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([os.path.join(REPO, "scripts", "bench"), "--quick", "--only", "v", "--vault-mb", "4",
                          "--json", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    # A tool's failure is in the report (stdout) and the JSON's "errors"; the progress lines are on stderr.
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    doc = json.loads(out.read_text())
    v = doc["figures"]["v_vault"]
    assert v["data"]["v1"]["bytes"] >= 4_000_000 and v["data"]["v2"]["changed_bytes"] > 0

    tools = ["restic", "borg"]
    if "skipped" in v["statefs"]:
        assert "statefs vault not available" in v["statefs"]["skipped"]
    else:
        tools.append("statefs")
        s = v["statefs"]
        for field in ("statefsd_peak_rss_bytes", "vault_cli_peak_rss_bytes"):
            assert _positive(s[field]), field
        assert s["peak_rss_bytes"] == s["statefsd_peak_rss_bytes"] + s["vault_cli_peak_rss_bytes"]
        assert s["stored_bytes"] == s["stored"]["log_used_bytes"] >= s["stored"]["live_bytes"] > 0
    for tool in tools:
        r = v[tool]
        assert "error" not in r, (tool, r.get("error"))
        assert r["restore_identical"] is True, tool
        for field in FIGURES:
            assert _positive(r[field]), (tool, field, r.get(field))
        # Both versions are in the repository: at least the first one's bytes.
        assert r["stored_bytes"] >= v["data"]["v1"]["bytes"] * 0.9, tool

    for name in VAULT_RATIOS:
        target = doc["targets"][name]
        assert target["value"] == doc["ratios"][name]
        if "statefs" in tools:
            assert _positive(target["value"]) and isinstance(target["met"], bool), name
        else:
            assert target["value"] is None and target["met"] is None, name


def test_the_same_seed_makes_the_same_tree_and_version_2_changes_it(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    made = vault_data.make_v1(a, 600_000, seed=7)
    assert vault_data.make_v1(b, 600_000, seed=7) == made
    assert vault_data.differences(a, b) == []
    assert made["bytes"] >= 600_000 and len(made["large_files"]) == 4

    changes = vault_data.make_v2(b, seed=7)
    problems = vault_data.differences(a, b, limit=1000)
    assert len([p for p in problems if p.startswith("not in the source")]) == changes["added"]
    assert len([p for p in problems if p.startswith("missing from the restore")]) == changes["deleted"]
    different = [p for p in problems if p.startswith("different bytes")]
    assert len([p for p in different if "/large/" in "/" + p.split(": ")[1]]) == 4
    assert len(different) == 4 + changes["edited"]


def test_the_restore_check_names_a_flipped_byte_and_a_missing_file(tmp_path):
    source, restored = str(tmp_path / "src"), str(tmp_path / "dst")
    vault_data.make_v1(source, 300_000, seed=3)
    shutil.copytree(source, restored)
    assert vault_data.differences(source, restored) == []
    names = vault_data.files(restored)
    with open(os.path.join(restored, names[0]), "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    os.unlink(os.path.join(restored, names[-1]))
    assert vault_data.differences(source, restored) == [f"missing from the restore: {names[-1]}",
                                                        f"different bytes: {names[0]}"]


def test_a_tool_s_peak_rss_is_its_own_not_the_bench_process_s(tmp_path):
    from bench.vault import run_measured
    ballast = bytearray(256 << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # resident: the bench's own peak is now above 256 MiB
    small = run_measured(["true"], env=dict(os.environ), cwd=str(tmp_path))
    big = run_measured(["python3", "-c", "b = bytearray(96 << 20); b[::4096] = b'x' * len(b[::4096])"],
                       env=dict(os.environ), cwd=str(tmp_path))
    del ballast
    assert small["rss_bytes"] < 32 << 20
    assert 96 << 20 < big["rss_bytes"] < 160 << 20
