"""Workload (v): the StateFS vault against restic and borg, side by side on
the same generated data (bench/vault_data.py) and the same disk.

Per tool: the first backup (version 1), the second (version 2, the same
paths, so each tool finds its parent), the repository's size after both,
and a restore of version 2 into an empty directory, compared byte for byte
with the source. Every tool process is timed by wall clock and its peak RSS
comes from wait4's rusage; statefsd's from its VmHWM. Compression is off for
all three (restic `--compression off`, borg `--compression none`; the vault
does not compress); all three encrypt (restic always, borg repokey-blake2,
the vault seals every object and record itself, so its image is plain).
The page cache is warmed before every backup so no tool reads cold data
that another left warm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from bench import procs, vault_data
from bench.lab import Lab
from bench.params import Params
from bench.procs import REPO, ToolFailed, child_env, run_measured
from statefsd.client import Client

SEED = 1
PASSPHRASE = "statefs-bench-passphrase"
MB = 1_000_000


def dir_bytes(path: str) -> dict:
    """The bytes of every file under ``path`` and what `du -s` counts
    (allocated blocks of files and directories)."""
    files = allocated = 0
    for dirpath, dirnames, filenames in os.walk(path):
        allocated += os.lstat(dirpath).st_blocks * 512
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            files += st.st_size
            allocated += st.st_blocks * 512
    return {"file_bytes": files, "du_bytes": allocated}


def _version(argv: list[str]) -> str:
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError:
        return ""
    return (run.stdout or run.stderr).strip().splitlines()[0] if run.returncode == 0 else ""


class Tool:
    """One backup tool: missing() says why it cannot run (or None); the
    rest run it and raise ToolFailed."""

    name = ""

    def __init__(self, lab: Lab, data_bytes: int) -> None:
        self.lab = lab
        self.data_bytes = data_bytes
        self.repo = lab.path(f"vault-{self.name}-repo")
        self.rss = 0

    def missing(self) -> str | None:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def init(self) -> None:
        raise NotImplementedError

    def backup(self, source: str) -> tuple[float, dict]:
        """Back up ``source``; wall seconds and what the tool said it
        added (its own JSON summary, trimmed)."""
        raise NotImplementedError

    def restore(self, target: str) -> str:
        """Restore the latest snapshot into the empty ``target``; returns
        the directory that holds the restored tree."""
        raise NotImplementedError

    def stored(self) -> dict:
        return dir_bytes(self.repo)

    def extra(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    def run(self, argv: list[str], *, cwd: str | None = None) -> dict:
        result = run_measured(argv, env=self.env(), cwd=cwd or self.lab.dir)
        self.rss = max(self.rss, result["rss_bytes"])
        return result

    def env(self) -> dict:
        return child_env()


class Restic(Tool):
    name = "restic"

    def missing(self):
        return None if shutil.which("restic") else "restic is not installed (scripts/setup installs it)"

    def version(self):
        return _version(["restic", "version"])

    def env(self):
        return {**child_env(), "RESTIC_REPOSITORY": self.repo, "RESTIC_PASSWORD": PASSPHRASE,
                "RESTIC_CACHE_DIR": self.lab.path("vault-restic-cache")}

    def init(self):
        # Repository format 2 is the one that has --compression (format 1 never compresses).
        self.run(["restic", "init", "--repository-version", "2"])

    def backup(self, source):
        r = self.run(["restic", "backup", "--compression", "off", "--json", "-q", "."], cwd=source)
        summary = _last_json(r["stdout"])
        return r["seconds"], {k: summary.get(k) for k in ("data_added", "files_new", "files_changed",
                                                          "total_bytes_processed")}

    def restore(self, target):
        self.run(["restic", "restore", "latest", "--target", target])
        return target

    def extra(self):
        return {"cache_bytes": dir_bytes(self.lab.path("vault-restic-cache"))["file_bytes"],
                "settings": "repository format 2, --compression off, AES-256-CTR + Poly1305 (always on)"}


class Borg(Tool):
    name = "borg"

    def missing(self):
        return None if shutil.which("borg") else "borg is not installed (scripts/setup installs borgbackup)"

    def version(self):
        return _version(["borg", "--version"])

    def env(self):
        return {**child_env(), "BORG_REPO": self.repo, "BORG_PASSPHRASE": PASSPHRASE,
                "BORG_BASE_DIR": self.lab.path("vault-borg-base")}

    def init(self):
        self.archives = 0
        self.run(["borg", "init", "--encryption", "repokey-blake2"])

    def backup(self, source):
        self.archives += 1
        r = self.run(["borg", "create", "--compression", "none", "--json", f"::v{self.archives}", "."], cwd=source)
        stats = (_last_json(r["stdout"]).get("archive") or {}).get("stats") or {}
        return r["seconds"], {k: stats.get(k) for k in ("deduplicated_size", "original_size", "nfiles")}

    def restore(self, target):
        self.run(["borg", "extract", f"::v{self.archives}"], cwd=target)
        return target

    def extra(self):
        return {"cache_bytes": dir_bytes(self.lab.path("vault-borg-base"))["file_bytes"],
                "settings": "--encryption repokey-blake2 (AES-256-CTR + BLAKE2b), --compression none"}


def statefs_vault_missing() -> str | None:
    """Why `statefs vault` cannot be benched in this tree, or None."""
    run = subprocess.run([sys.executable, "-m", "statefsd.cli", "vault", "--help"], capture_output=True,
                         cwd=REPO, env=child_env(), timeout=60)
    if run.returncode != 0:
        return "statefs vault not available (`statefs vault --help` fails in this tree)"
    return None


class StateFSVault(Tool):
    """The vault CLI against a statefsd (and keystored) the bench starts on
    a fresh image sized for both versions plus room to compact."""

    name = "statefs"

    def __init__(self, lab, data_bytes):
        super().__init__(lab, data_bytes)
        self.image = lab.path("vault.img")
        self.image_bytes = ((3 * data_bytes + (64 << 20)) >> 20) << 20
        self.socket = lab.path("vault.sock")
        self.daemon: procs.Process | None = None
        self.keystore = ""
        self.info_after: dict = {}
        self.hwm_after_backups = 0

    def missing(self):
        return statefs_vault_missing()

    def version(self):
        return "statefs " + _version([sys.executable, "-c", "import importlib.metadata as m; "
                                                            "print(m.version('statefs'))"])

    def env(self):
        return {**child_env(), "STATEFS_SOCKET": self.socket, "STATEFS_KEYSTORE_SOCKET": self.keystore,
                "STATEFS_VAULT_PASSPHRASE": PASSPHRASE}

    def cli(self, *args: str, cwd: str | None = None) -> dict:
        return self.run([sys.executable, "-m", "statefsd.cli", "vault", *args], cwd=cwd or REPO)

    def init(self):
        procs.fresh_image(self.image, self.image_bytes)
        self.keystore = self.lab.keystore_socket()
        self.daemon = procs.statefsd(self.image, self.socket, keystore=self.keystore)
        self.cli("init", "--json")

    def backup(self, source):
        r = self.cli("backup", source, "--json")
        return r["seconds"], _last_json(r["stdout"])

    def restore(self, target):
        self.cli("restore", "latest", "--target", target, "--json")
        return target

    def stored(self):
        self.hwm_after_backups = self.daemon.memory()["VmHWM"]
        with Client(self.socket, timeout=3600) as client:
            before = client.info()
            client.compact()
            self.info_after = client.info()
        st = os.stat(self.image)
        return {"log_used_bytes": self.info_after["log_used"], "live_bytes": self.info_after["live_bytes"],
                "log_used_before_compact": before["log_used"], "keys": self.info_after["keys"],
                "image_bytes": st.st_size, "image_allocated_bytes": st.st_blocks * 512}

    def daemon_hwm(self) -> int:
        return self.daemon.memory()["VmHWM"] if self.daemon else 0

    def extra(self):
        return {"statefsd_peak_rss_bytes": self.daemon_hwm(), "statefsd_hwm_before_compact": self.hwm_after_backups,
                "vault_cli_peak_rss_bytes": self.rss,
                "settings": f"image {self.image_bytes >> 20} MiB, encryption off (the vault seals objects and "
                            "records itself), redundancy parity, no compression"}

    def close(self):
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


def _last_json(text: str) -> dict:
    """A tool's JSON summary: the whole output, or its last JSON line."""
    for candidate in (text, *reversed(text.strip().splitlines())):
        try:
            doc = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return {}


def restored_root(target: str, source: str) -> str:
    """Where a tool put the restored tree: the target itself, or the
    source's absolute path or its last component recreated under it."""
    for candidate in (os.path.join(target, source.lstrip(os.sep)),
                      os.path.join(target, os.path.basename(source))):
        if os.path.isdir(candidate) and len(os.listdir(target)) == 1:
            return candidate
    return target


def vault(lab: Lab, p: Params, progress) -> dict:
    data = lab.path("vault-data")
    progress(f"vault: generating {p.vault_bytes / MB:,.0f} MB (seed {SEED})")
    v1 = vault_data.make_v1(data, p.vault_bytes, SEED)
    tools = [Restic(lab, v1["bytes"]), Borg(lab, v1["bytes"]), StateFSVault(lab, v1["bytes"])]
    results: dict = {}
    live = []
    for tool in tools:
        reason = tool.missing()
        results[tool.name] = {"skipped": reason} if reason else {"version": tool.version()}
        if not reason:
            live.append(tool)

    def phase(label: str, step) -> None:
        for tool in list(live):
            progress(f"vault: {tool.name} {label}")
            try:
                step(tool, results[tool.name])
            except Exception as exc:  # one tool's failure must not lose the others' figures
                results[tool.name]["error"] = f"{label}: {type(exc).__name__}: {exc}"
                live.remove(tool)
                tool.close()

    def first(tool, r):
        tool.init()
        vault_data.warm(data)
        s, r["first_backup_reported"] = tool.backup(data)
        r["first_backup_s"] = round(s, 3)
        r["first_backup_mb_per_s"] = round(v1["bytes"] / s / MB, 2)

    def second(tool, r):
        vault_data.warm(data)
        s, r["second_backup_reported"] = tool.backup(data)
        r["second_backup_s"] = round(s, 3)

    def stored(tool, r):
        r["stored"] = tool.stored()
        r["stored_bytes"] = r["stored"].get("log_used_bytes", r["stored"].get("file_bytes"))

    def restore(tool, r):
        target = lab.path(f"vault-restore-{tool.name}")
        os.makedirs(target)
        try:
            began = time.monotonic()
            root = tool.restore(target)
            s = time.monotonic() - began
            root = restored_root(root, data)
            problems = vault_data.differences(data, root)
            r["restore_identical"] = not problems
            if problems:
                raise ToolFailed("restore is not byte-identical to the source: " + "; ".join(problems))
            r["restore_s"] = round(s, 3)
            r["restore_mb_per_s"] = round(v2["bytes"] / s / MB, 2)
        finally:
            shutil.rmtree(target, ignore_errors=True)

    try:
        phase("first backup", first)
        progress("vault: making version 2")
        v2 = vault_data.make_v2(data, SEED)
        phase("second backup", second)
        phase("stored bytes", stored)
        phase("restore", restore)
        for tool in live:
            r = results[tool.name]
            r.update(tool.extra())
            r["peak_rss_bytes"] = tool.rss + (tool.daemon_hwm() if isinstance(tool, StateFSVault) else 0)
    finally:
        for tool in tools:
            tool.close()
        shutil.rmtree(data, ignore_errors=True)
    errors = [f"{name}: {r['error']}" for name, r in results.items() if "error" in r]
    return {
        "data": {"v1": v1, "v2": v2, "seed": SEED}, **results,
        "notes": [
            "stored_bytes: restic and borg the bytes of every file in the repository (du_bytes beside it counts "
            "allocated blocks); StateFS log_used after `compact` (live_bytes and the image's allocated blocks beside "
            "it; the image file is written with zeros up front, so all its blocks are allocated)",
            "peak RSS: each tool process's own ru_maxrss (forked from a small wrapper, floor ~8 MiB); StateFS "
            "peak_rss_bytes = the vault CLI's peak + statefsd's VmHWM (keystored not counted)",
            "each backup and restore is one process's wall time (fork to exit), start-up and key derivation "
            "included",
        ],
        **({"errors": errors} if errors else {}),
    }
