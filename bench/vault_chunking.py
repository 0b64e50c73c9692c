"""How big the vault's chunks should be: the curve of chunk count, dedup of a
second version, per-object overhead and chunking speed against the average
chunk size, on the backup bench's own data (bench/vault_data.py).

    python -m bench.vault_chunking [--size MB] [--seed N] [--dir DIR] [--json PATH]

Chunker: pyfastcdc, keyed gear table (``seed``), normalized chunking 1,
min = avg/4, max = avg*4 capped at 8 MiB - 64 KiB (one StateFS value holds a
sealed chunk). Stored bytes model what the vault writes per new object: its
sealed data as the vault sizes it (records.stored_size: Padmé(4 + length), at
least 512, + 24-byte nonce + 16-byte tag), plus OBJECT_OVERHEAD for its o/
and z/ records and the StateFS record headers.
A file of more than one chunk also needs chunk-list nodes (ENTRY_BYTES per
chunk, fan-out 60); when a file changes, all of its nodes are counted as new
(an upper bound: an insert shifts which chunks each node groups). Directory
nodes are the same at every chunk size and are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from pyfastcdc import FastCDC

from bench import vault_data
from statefsd.vault import records as rec

KIB, MIB = 1 << 10, 1 << 20
AVERAGES = (64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1 * MIB, 2 * MIB)
MAX_CHUNK = 8 * MIB - 64 * KIB
OBJECT_OVERHEAD = 250          # o/ + z/ records and the StateFS record headers, per object
ENTRY_BYTES = 41               # msgpack [bin 32-byte id, uint size] in a chunk-list node
CHUNKER_SEED = 0x5EED_0F_C0FFEE & ((1 << 63) - 1)
ID_KEY = bytes(range(32))


def chunker(avg: int) -> FastCDC:
    return FastCDC(avg, min_size=avg // 4, max_size=min(avg * 4, MAX_CHUNK), normalized_chunking=1,
                   seed=CHUNKER_SEED)


def object_bytes(length: int) -> int:
    """What one new object of ``length`` plaintext bytes costs on the image."""
    return rec.stored_size(length) + OBJECT_OVERHEAD


def node_bytes(chunks: int) -> tuple[int, int]:
    """(nodes, stored bytes) of the chunk-list nodes for a file of ``chunks``."""
    if chunks <= 1:
        return 0, 0
    nodes = stored = 0
    level = chunks
    while level > 1:
        count = -(-level // rec.FANOUT)
        for i in range(count):
            entries = min(rec.FANOUT, level - i * rec.FANOUT)
            stored += object_bytes(8 + entries * ENTRY_BYTES)
        nodes += count
        level = count
    return nodes, stored


def index(root: str, cdc: FastCDC) -> tuple[dict[str, list[tuple[bytes, int]]], float, float]:
    """Every file's chunks (keyed BLAKE3 id, length); seconds spent cutting
    and seconds spent cutting plus hashing."""
    out, cut_s, all_s = {}, 0.0, 0.0
    for rel in vault_data.files(root):
        path = os.path.join(root, rel)
        began = time.perf_counter()
        chunks = list(cdc.cut_file(path)) if os.path.getsize(path) else []
        cut = time.perf_counter()
        out[rel] = [(rec.object_id(ID_KEY, rec.KIND_CHUNK, c.data), c.length) for c in chunks]
        done = time.perf_counter()
        cut_s += cut - began
        all_s += done - began
        del chunks
    return out, cut_s, all_s


def measure(v1: dict, v2: dict) -> dict:
    """Objects and stored bytes of v1, then what v2 adds on top."""
    stored1, seen = 0, {}
    chunks1 = nodes1 = 0
    for chunks in v1.values():
        chunks1 += len(chunks)
        for cid, length in chunks:
            if cid not in seen:
                seen[cid] = length
                stored1 += object_bytes(length)
        n, b = node_bytes(len(chunks))
        nodes1 += n
        stored1 += b
    new_chunks = new_raw = stored2 = nodes2 = 0
    for rel, chunks in v2.items():
        changed = v1.get(rel) != chunks
        for cid, length in chunks:
            if cid not in seen:
                seen[cid] = length
                new_chunks += 1
                new_raw += length
                stored2 += object_bytes(length)
        if changed:
            n, b = node_bytes(len(chunks))
            nodes2 += n
            stored2 += b
    v1_bytes = sum(length for chunks in v1.values() for _, length in chunks)
    return {
        "v1_chunks": chunks1, "v1_unique_chunks": len(seen) - new_chunks, "v1_nodes": nodes1,
        "mean_chunk_bytes": round(v1_bytes / chunks1) if chunks1 else 0,
        "v1_stored_bytes": stored1, "v1_overhead_bytes": stored1 - v1_bytes,
        "v2_new_chunks": new_chunks, "v2_new_nodes": nodes2, "v2_new_chunk_bytes": new_raw,
        "v2_stored_bytes": stored2, "total_stored_bytes": stored1 + stored2,
    }


def curve(v1_root: str, make_v2, progress=lambda text: None) -> dict:
    """Index v1 at every average, let ``make_v2`` edit the tree (the tree at
    ``v1_root`` becomes v2), index again, and measure."""
    cdcs = {avg: chunker(avg) for avg in AVERAGES}
    data_bytes = vault_data.tree_bytes(v1_root)
    firsts = {}
    for avg, cdc in cdcs.items():
        progress(f"chunking v1 at {avg // KIB} KiB average")
        firsts[avg] = index(v1_root, cdc)
    changes = make_v2()
    rows = []
    for avg, cdc in cdcs.items():
        progress(f"chunking v2 at {avg // KIB} KiB average")
        v1, cut_s, all_s = firsts[avg]
        v2, _, _ = index(v1_root, cdc)
        row = {"avg": avg, "min": cdc.min_size, "max": cdc.max_size, **measure(v1, v2),
               "chunk_mb_per_s": round(data_bytes / cut_s / 1e6, 1),
               "chunk_and_hash_mb_per_s": round(data_bytes / all_s / 1e6, 1)}
        rows.append(row)
    return {"data_bytes": data_bytes, "v2_changes": changes, "object_overhead_bytes": OBJECT_OVERHEAD,
            "rows": rows, "recommendation": recommend(rows)}


def recommend(rows: list[dict]) -> dict:
    """The largest average whose v2 cost stays within 1.5x the best one:
    fewer objects (records, transactions, index entries) for nearly the same
    dedup."""
    best = min(r["v2_stored_bytes"] for r in rows)
    fit = [r for r in rows if r["v2_stored_bytes"] <= 1.5 * best]
    pick = max(fit, key=lambda r: r["avg"])
    return {"avg": pick["avg"], "min": pick["min"], "max": pick["max"],
            "why": f"largest average whose v2 stored bytes ({pick['v2_stored_bytes']:,}) are within 1.5x "
                   f"of the smallest ({best:,}), with {pick['v1_chunks']:,} v1 chunks"}


def table(result: dict) -> str:
    """The curve as a Markdown table (for bench/README.md and the terminal)."""
    head = ("| avg | min | max | v1 chunks | mean chunk | v1 overhead | v2 new chunks | v2 new chunk bytes "
            "| v2 stored | total stored | chunk MB/s | chunk+hash MB/s |")
    lines = [head, "|" + "---|" * 12]
    for r in result["rows"]:
        lines.append(
            f"| {_size(r['avg'])} | {_size(r['min'])} | {_size(r['max'])} | {r['v1_chunks']:,} "
            f"| {r['mean_chunk_bytes'] / KIB:,.0f} KiB | {r['v1_overhead_bytes'] / MIB:,.2f} MiB "
            f"| {r['v2_new_chunks']:,} | {r['v2_new_chunk_bytes'] / MIB:,.2f} MiB "
            f"| {r['v2_stored_bytes'] / MIB:,.2f} MiB | {r['total_stored_bytes'] / MIB:,.1f} MiB "
            f"| {r['chunk_mb_per_s']:,.0f} | {r['chunk_and_hash_mb_per_s']:,.0f} |")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n / KIB:g} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vault_chunking", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=500, help="data size in MB (default 500, as scripts/bench)")
    parser.add_argument("--seed", type=int, default=1, help="data generator seed (default 1)")
    parser.add_argument("--dir", help="parent directory for the generated tree (default: temp dir)")
    parser.add_argument("--json", metavar="PATH", help="write every figure here")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="statefs-chunking-", dir=args.dir)
    try:
        root = os.path.join(work, "data")
        made = vault_data.make_v1(root, args.size * 1_000_000, args.seed)
        print(f"data: {made['files']:,} files, {made['bytes'] / 1e6:,.1f} MB (seed {args.seed})", file=sys.stderr)
        result = curve(root, lambda: vault_data.make_v2(root, args.seed),
                       progress=lambda text: print(text, file=sys.stderr))
        result["v1"] = made
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    rec = result["recommendation"]
    print(f"\nrecommendation: avg {_size(rec['avg'])}, min {_size(rec['min'])}, max {_size(rec['max'])}: "
          f"{rec['why']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
