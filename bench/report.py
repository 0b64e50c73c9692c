"""Ratios against the project's targets, and the human-readable tables."""

from __future__ import annotations

import operator

from rich.console import Console
from rich.table import Table

# name: (comparison, threshold, what it compares)
TARGETS = {
    "single_client_vs_flush_limit": (">=", 0.8, "(a) 1 client, 100 B: StateFS txn/s / single 512 B O_DSYNC "
                                               "writes per s"),
    "single_client_vs_sqlite": (">=", 1.5, "(a) 1 client, 100 B: StateFS txn/s / SQLite txn/s"),
    "clients16_vs_sqlite": (">=", 5.0, "(b) 16 clients, 100 B: StateFS txn/s / SQLite txn/s"),
    "clients16_p99_vs_sqlite": ("<=", 2.0, "(b) 16 clients, 100 B: StateFS p99 / SQLite p99"),
    "encrypted_vs_plain_100": (">=", 0.9, "(b) 16 clients, 100 B: encrypted txn/s / plain txn/s"),
    "encrypted_vs_plain_4k": (">=", 0.9, "(b) 16 clients, 4 KiB: encrypted txn/s / plain txn/s"),
    "batch100_vs_sqlite": (">=", 1.5, "(c) 1 client, 100 puts per txn, 100 B: StateFS puts/s / SQLite puts/s"),
    "bulk_plain_vs_disk": (">=", 0.6, "(d) 1 MiB values: plain MB/s / disk write+fsync MB/s"),
    "bulk_encrypted_vs_disk": (">=", 0.5, "(d) 1 MiB values: encrypted MB/s / disk write+fsync MB/s"),
    "mount_1m_before_compaction_s": ("<=", 3.0, "(e) mount before compaction, largest history (1M txns in "
                                                "the full run), seconds"),
    "mount_1m_vs_1k_after_compaction": ("<=", 1.5, "(e) mount after compaction: largest history / 1k"),
    "fsck_mb_per_s": (">=", 300.0, "(f) fsck scan rate, 4 KiB records, MB/s"),
    "fsck_mb_per_s_100b": (">=", 300.0, "(f) fsck scan rate, 100 B records, MB/s"),
    "compaction_write_amp": ("<=", 1.2, "(g) bytes compaction wrote / live bytes"),
    "compaction_p99_vs_idle": ("<=", 3.0, "(g) probe p99 during compaction / idle p99"),
    "redundancy_single_client": (">=", 0.9, "(a) 1 client, 100 B: parity on / redundancy off txn/s"),
    "redundancy_bulk": (">=", 0.9, "(d) 1 MiB values: parity on / redundancy off MB/s"),
    "statefsd_bytes_per_key": ("<=", 150.0, "(h) statefsd RSS growth per key (1M keys in the full run), bytes"),
    "vault_first_backup_vs_restic": (">=", 2.0, "(v) first backup MB/s: StateFS vault / restic"),
    "vault_second_backup_vs_restic": ("<=", 0.5, "(v) second backup seconds: StateFS vault / restic"),
    "vault_stored_vs_restic": ("<=", 1.0, "(v) stored bytes after both versions: StateFS vault / restic"),
    "vault_restore_vs_restic": (">=", 2.0, "(v) restore MB/s: StateFS vault / restic"),
    "vault_peak_rss_vs_restic": ("<=", 1.0, "(v) peak RSS: vault CLI + statefsd / restic"),
}
# ratio name: the (v) figure it divides, StateFS vault over restic
VAULT_RATIOS = {
    "vault_first_backup_vs_restic": "first_backup_mb_per_s",
    "vault_second_backup_vs_restic": "second_backup_s",
    "vault_stored_vs_restic": "stored_bytes",
    "vault_restore_vs_restic": "restore_mb_per_s",
    "vault_peak_rss_vs_restic": "peak_rss_bytes",
}
# ratio name: the (r) figure holding it (no targets yet: the closing note
# of replication reports them)
REPLICA_RATIOS = ["replica_vs_rclone_copy", "replica_upload_vs_rclone_copy", "replica_vs_syncthing",
                  "replica_lag_vs_syncthing"]
_OPS = {">=": operator.ge, "<=": operator.le}


def _dig(tree, *path):
    for step in path:
        try:
            tree = tree[step]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def _div(a, b):
    if a is None or b is None or not b:
        return None
    return round(a / b, 4)


def ratios(figures: dict) -> dict:
    a, b = figures.get("a_single_client"), figures.get("b_concurrent_clients")
    c, d, e = figures.get("c_100_puts_per_txn"), figures.get("d_bulk_1mib"), figures.get("e_mount")
    g, v = figures.get("g_compaction"), figures.get("v_vault")
    rows = _dig(e, "histories") or []
    vault = {name: _div(_dig(v, "statefs", field), _dig(v, "restic", field)) for name, field in VAULT_RATIOS.items()}
    replica = {name: _dig(figures, "r_replica", name) for name in REPLICA_RATIOS}
    return {
        "single_client_vs_flush_limit": _div(_dig(a, "statefs", "100", "txn_per_s"),
                                             _dig(a, "disk_dsync_write", "100", "txn_per_s")),
        "single_client_vs_sqlite": _div(_dig(a, "statefs", "100", "txn_per_s"), _dig(a, "sqlite", "100", "txn_per_s")),
        "clients16_vs_sqlite": _div(_dig(b, "statefs", "100", "txn_per_s"), _dig(b, "sqlite", "100", "txn_per_s")),
        "clients16_p99_vs_sqlite": _div(_dig(b, "statefs", "100", "p99_us"), _dig(b, "sqlite", "100", "p99_us")),
        "encrypted_vs_plain_100": _div(_dig(b, "statefs_encrypted", "100", "txn_per_s"),
                                       _dig(b, "statefs", "100", "txn_per_s")),
        "encrypted_vs_plain_4k": _div(_dig(b, "statefs_encrypted", "4096", "txn_per_s"),
                                      _dig(b, "statefs", "4096", "txn_per_s")),
        "batch100_vs_sqlite": _div(_dig(c, "statefs", "100", "puts_per_s"), _dig(c, "sqlite", "100", "puts_per_s")),
        "bulk_plain_vs_disk": _div(_dig(d, "statefs", "mb_per_s"), _dig(d, "disk_write_fsync", "mb_per_s")),
        "bulk_encrypted_vs_disk": _div(_dig(d, "statefs_encrypted", "mb_per_s"),
                                       _dig(d, "disk_write_fsync", "mb_per_s")),
        "mount_1m_before_compaction_s": _dig(rows, -1, "mount_before_s"),
        "mount_1m_vs_1k_after_compaction": _div(_dig(rows, -1, "mount_after_s"), _dig(rows, 0, "mount_after_s"))
        if len(rows) > 1 else None,
        "fsck_mb_per_s": _dig(figures, "f_fsck", "4096", "mb_per_s"),
        "fsck_mb_per_s_100b": _dig(figures, "f_fsck", "100", "mb_per_s"),
        "compaction_write_amp": _dig(g, "write_amplification"),
        "compaction_p99_vs_idle": _dig(g, "p99_during_vs_idle"),
        "redundancy_single_client": _div(_dig(a, "statefs", "100", "txn_per_s"),
                                         _dig(a, "statefs_no_redundancy", "100", "txn_per_s")),
        "redundancy_bulk": _div(_dig(d, "statefs", "mb_per_s"), _dig(d, "statefs_no_redundancy", "mb_per_s")),
        "statefsd_bytes_per_key": _dig(figures, "h_memory", "bytes_per_key"),
        **vault,
        **replica,
    }


def judge(values: dict) -> dict:
    out = {}
    for name, (op, threshold, what) in TARGETS.items():
        value = values.get(name)
        out[name] = {"value": value, "op": op, "target": threshold, "what": what,
                     "met": None if value is None else bool(_OPS[op](value, threshold))}
    return out


# ------------------------------------------------------------------ tables

def _n(x, digits=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}"


def _throughput_table(title: str, fig: dict) -> Table:
    t = Table(title=title)
    for col in ("store", "value", "clients", "puts/txn", "txn/s", "puts/s", "MB/s", "p50 us", "p99 us", "mean us",
                "p99.9 us", "max us"):
        t.add_column(col, justify="left" if col == "store" else "right")
    for store, by_size in fig.items():
        for size, r in by_size.items():
            t.add_row(store, f"{size} B", str(r["clients"]), str(r["puts_per_txn"]), _n(r["txn_per_s"]),
                      _n(r["puts_per_s"]), _n(r["mb_per_s"], 2), _n(r["p50_us"]), _n(r["p99_us"]),
                      _n(r.get("mean_us")), _n(r.get("p999_us")), _n(r.get("max_us")))
    return t


def render(doc: dict, console: Console) -> None:
    figures = doc["figures"]
    for key, title in (("a_single_client", "(a) one client, one put per txn"),
                       ("b_concurrent_clients", "(b) concurrent client processes, one put per txn"),
                       ("c_100_puts_per_txn", "(c) one client, 100 puts per txn")):
        if key in figures and "error" not in figures[key]:
            console.print(_throughput_table(title, figures[key]))
    d = figures.get("d_bulk_1mib")
    if d and "error" not in d:
        t = Table(title="(d) bulk 1 MiB values, one per durable txn")
        for col in ("store", "MB/s", "p50 us", "p99 us"):
            t.add_column(col, justify="left" if col == "store" else "right")
        for store, r in d.items():
            t.add_row(store, _n(r["mb_per_s"]), _n(r["p50_us"]), _n(r["p99_us"]))
        console.print(t)
    e = figures.get("e_mount")
    if e and "error" not in e:
        t = Table(title=f"(e) mount time vs history ({e['keys']} keys, image {e['image_bytes'] >> 20} MiB)")
        for col in ("txns", "build txn/s", "mount before s", "compaction s", "mount after s"):
            t.add_column(col, justify="right")
        for r in e["histories"]:
            t.add_row(_n(r["txns"]), _n(r["build_txn_per_s"]), _n(r["mount_before_s"], 4),
                      _n(r["compaction_s"], 4), _n(r["mount_after_s"], 4))
        console.print(t)
        for note in e.get("notes", []):
            console.print(f"  note: {note}")
    t = Table(title="(f) fsck, (g) compaction, (h) memory")
    t.add_column("figure")
    t.add_column("value", justify="right")
    f, g, h = figures.get("f_fsck") or {}, figures.get("g_compaction") or {}, figures.get("h_memory") or {}
    for size in ("4096", "100"):
        r = f.get(size) or {}
        t.add_row(f"fsck scan MB/s, {size} B records",
                  _n(r.get("mb_per_s")) if r.get("mb_per_s") is not None else r.get("note", f.get("note", "-")))
    t.add_row("compactions observed", _n(g.get("compactions")))
    t.add_row("compaction write amplification", _n(g.get("write_amplification"), 3))
    t.add_row("probe p99 idle (us)", _n(g.get("p99_idle_us")))
    t.add_row("probe p99 during compaction (us)", _n(g.get("p99_during_compaction_us")))
    t.add_row(f"statefsd RSS at {_n(h.get('keys'))} keys (MiB)", _n(h.get("rss_mib"), 2))
    t.add_row("statefsd RSS growth per key (bytes)", _n(h.get("bytes_per_key")))
    console.print(t)
    v = figures.get("v_vault")
    if v and "error" not in v:
        _vault_table(v, console)
    r = figures.get("r_replica")
    if r and "error" not in r:
        _replica_table(r, console)
    for key, fig in figures.items():
        if isinstance(fig, dict) and "error" in fig:
            console.print(f"[red]{key} failed: {fig['error']}[/red]")
    t = Table(title="ratios against targets (each from this run's figures)")
    for col in ("ratio", "value", "target", "met"):
        t.add_column(col, justify="right" if col in ("value", "target") else "left")
    for name, r in doc["targets"].items():
        met = "-" if r["met"] is None else ("[green]met[/green]" if r["met"] else "[red]missed[/red]")
        t.add_row(name, _n(r["value"], 3), f"{r['op']} {r['target']}", met)
    console.print(t)


def _vault_table(v: dict, console: Console) -> None:
    t = Table(title=f"(v) backup tools on {v['data']['v1']['bytes'] / 1e6:,.0f} MB "
                    f"({v['data']['v1']['files']:,} files), then version 2")
    for col in ("tool", "1st backup MB/s", "2nd backup s", "stored MiB", "restore MB/s", "peak RSS MiB",
                "identical"):
        t.add_column(col, justify="left" if col == "tool" else "right")
    mib = 1 << 20
    for tool in ("restic", "borg", "statefs"):
        r = v.get(tool) or {}
        if "skipped" in r or "error" in r:
            t.add_row(tool, *["-"] * 6)
            continue
        t.add_row(tool, _n(r.get("first_backup_mb_per_s")), _n(r.get("second_backup_s"), 2),
                  _n(r["stored_bytes"] / mib if r.get("stored_bytes") else None, 2), _n(r.get("restore_mb_per_s")),
                  _n(r["peak_rss_bytes"] / mib if r.get("peak_rss_bytes") else None),
                  {True: "yes", False: "[red]NO[/red]"}.get(r.get("restore_identical"), "-"))
    console.print(t)
    for tool in ("restic", "borg", "statefs"):
        r = v.get(tool) or {}
        if "skipped" in r:
            console.print(f"  [yellow]{tool} skipped: {r['skipped']}[/yellow]")
        elif "error" in r:
            console.print(f"  [red]{tool} failed: {r['error']}[/red]")
    for note in v.get("notes", []):
        console.print(f"  note: {note}")


def _replica_table(r: dict, console: Console) -> None:
    if "skipped" in r:
        console.print(f"  [yellow](r) replication skipped: {r['skipped']}[/yellow]")
        return
    versions = r.get("versions", {})
    t = Table(title=f"(r) replication of {r['data']['bytes'] / (1 << 20):,.0f} MiB ({r['data']['files']:,} files), "
                    f"syncthing {versions.get('syncthing', '?')}, {versions.get('rclone', 'rclone ?')}")
    for col in ("step", "StateFS s", "StateFS MB/s", "plain engine s", "plain MB/s", "ratio"):
        t.add_column(col, justify="left" if col == "step" else "right")
    rem, peer, lag, rest = r["remote"], r["peer"], r["lag"], r["restore"]
    t.add_row("vault backup", _n(r["backup"]["seconds"], 2), _n(r["backup"]["mb_per_s"]), "", "", "")
    t.add_row("push into the outbox", _n(r["push"]["seconds"], 2), _n(r["push"]["mb_per_s"]), "", "", "")
    t.add_row("SFTP remote: push + upload vs rclone copy", _n(rem["statefs_push_upload_s"], 2),
              _n(rem["statefs_push_upload_mb_per_s"]), _n(rem["rclone_copy_s"], 2), _n(rem["rclone_copy_mb_per_s"]),
              _n(r["replica_vs_rclone_copy"], 3))
    t.add_row("SFTP remote: upload alone vs rclone copy", _n(rem["statefs_upload_s"], 2),
              _n(rem["statefs_upload_mb_per_s"]), _n(rem["rclone_copy_s"], 2), _n(rem["rclone_copy_mb_per_s"]),
              _n(r["replica_upload_vs_rclone_copy"], 3))
    t.add_row("peer: share until received vs Syncthing", _n(peer["statefs_sync_s"], 2),
              _n(peer["statefs_sync_mb_per_s"]), _n(peer["syncthing_plain_s"], 2),
              _n(peer["syncthing_plain_mb_per_s"]), _n(r["replica_vs_syncthing"], 3))
    t.add_row(f"lag, one small change (median of {len(lag['statefs_s'])})", _n(lag["statefs_median_s"], 2), "",
              _n(lag["syncthing_median_s"], 2), "", _n(r["replica_lag_vs_syncthing"], 3))
    t.add_row("restore from the peer's copy", _n(rest["seconds"], 2), _n(rest["mb_per_s"]), "", "",
              "equal" if rest["equal"] else "[red]DIFFERS[/red]")
    console.print(t)
    console.print(f"  outbox {r['push']['outbox_bytes'] / (1 << 20):,.1f} MiB in {r['push']['outbox_files']:,} files; "
                  f"restored {rest['keys']:,} keys, the same as the source")
    for note in r.get("notes", []):
        console.print(f"  note: {note}")
