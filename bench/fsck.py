"""Workload (f): fsck scan rate over an image full of records, once with
4 KiB values and once with 100-byte ones (where per-record work dominates)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

from bench.lab import Lab
from bench.params import Params
from bench.procs import REPO, child_env, fresh_image
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine, Mutation
from statefsd.errors import NoSpace

RECORD_SIZES = (4096, 100)
PUTS_PER_TXN = 100


def fsck_available() -> bool:
    try:
        return importlib.util.find_spec("fsck_statefs.__main__") is not None
    except ImportError:
        return False


def fill_image(image: str, size: int, value_bytes: int) -> dict:
    """Format ``image`` and commit distinct values until the log is full
    (distinct keys: nothing is garbage, so the engine never compacts)."""
    fresh_image(image, size)
    engine = Engine.mount(FileDevice(image))
    value = (bytes(range(256)) * (-(-value_bytes // 256)))[:value_bytes]
    txns = 0
    try:
        while True:
            base = txns * PUTS_PER_TXN
            try:
                engine.commit([Mutation("put", f"fill/{base + j}", value) for j in range(PUTS_PER_TXN)])
            except NoSpace:
                break
            txns += 1
        info = engine.info()
    finally:
        engine.close()
    return {"txns": txns, "keys": info["keys"], "log_used": info["log_used"], "log_size": info["log_size"]}


def fsck_rate(lab: Lab, p: Params, progress) -> dict:
    """One scan per record size, keyed by the value size ("4096", "100")."""
    if not fsck_available():
        return {"note": "fsck_statefs is not importable (no fsck_statefs/__main__.py "
                        "in this tree); scan rate not measured"}
    return {str(size): _scan(lab, p, size, progress) for size in RECORD_SIZES}


def _scan(lab: Lab, p: Params, value_bytes: int, progress) -> dict:
    image = lab.path("fsck.img")
    progress(f"fsck: filling image with {value_bytes} B values")
    image_bytes = p.fsck_image if value_bytes >= 4096 else p.fsck_small_image
    filled = fill_image(image, image_bytes, value_bytes)
    progress(f"fsck: scanning {value_bytes} B records")
    startup = min(_timed([sys.executable, "-m", "fsck_statefs", "--help"])[0] for _ in range(2))
    elapsed, run = _timed([sys.executable, "-m", "fsck_statefs", image, "--json"])
    try:
        scan = json.loads(run.stdout).get("scan") or {}
    except (ValueError, AttributeError):
        scan = {}
    ok = run.returncode == 0
    if scan.get("seconds"):
        rate, source = scan["bytes"] / scan["seconds"] / 1e6, "fsck's own scan timing (log bytes / scan seconds)"
    else:
        rate, source = filled["log_used"] / max(elapsed - startup, 1e-6) / 1e6, "log bytes / (wall - start-up)"
    return {
        "value_bytes": value_bytes, "image_bytes": image_bytes, "filled": filled, "exit_code": run.returncode,
        "wall_seconds": round(elapsed, 4), "startup_seconds": round(startup, 4),
        "wall_mb_per_s": round(image_bytes / elapsed / 1e6, 2) if ok else None,
        "scan": scan, "mb_per_s": round(rate, 2) if ok else None, "mb_per_s_source": source,
        "stderr_tail": run.stderr.decode("utf-8", "replace")[-400:] if not ok else "",
    }


def _timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    began = time.monotonic()
    run = subprocess.run(argv, cwd=REPO, env=child_env(), capture_output=True, timeout=600)
    return time.monotonic() - began, run
