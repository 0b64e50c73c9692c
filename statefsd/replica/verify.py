"""What a copy of a replica holds, checked without any key: head
signatures, forks, and every listed segment against its signed digest.

A peer's node runs this on what Syncthing delivered; the owner runs it on
any copy before it trusts it. Only the owner can open segments (restore.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from statefsd.errors import IntegrityError
from statefsd.replica import format as rfmt


@dataclass
class CopyReport:
    path: str
    head_counter: int = 0
    signer: bytes | None = None
    segments: int = 0
    present: int = 0
    missing: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    head: rfmt.Head | None = None

    def ok(self) -> bool:
        return self.head is not None and not (self.missing or self.damaged or self.problems)

    def as_dict(self) -> dict:
        return {"path": self.path, "head_counter": self.head_counter,
                "signer": self.signer.hex() if self.signer else None, "segments": self.segments,
                "present": self.present, "missing": self.missing, "damaged": self.damaged,
                "retired": self.retired, "problems": self.problems, "ok": self.ok()}


def read_heads(root: Path, problems: list[str]) -> list[rfmt.Head]:
    """Every valid head file in the copy, oldest first; what is wrong with
    the others goes to ``problems``."""
    heads: list[rfmt.Head] = []
    head_dir = root / rfmt.HEAD_DIR
    names = sorted(os.listdir(head_dir)) if head_dir.is_dir() else []
    for name in names:
        rel = f"{rfmt.HEAD_DIR}/{name}"
        parsed = rfmt.parse_head_name(rel)
        if parsed is None:
            continue                     # an engine's temp or conflict file: not ours to judge
        try:
            head = rfmt.decode_head_file((head_dir / name).read_bytes(), rel)
        except (IntegrityError, OSError) as exc:
            problems.append(f"{rel}: {getattr(exc, 'message', exc)}")
            continue
        if rfmt.head_name(head.signer, head.counter) != rel:
            problems.append(f"{rel}: the file name does not match the head it holds (counter {head.counter})")
            continue
        heads.append(head)
    heads.sort(key=lambda h: h.counter)
    return heads


def fork_problems(heads: list[rfmt.Head]) -> list[str]:
    """Two histories under one signer: two heads with one counter, or a
    newer head that lists an older head's segment with another digest."""
    problems: list[str] = []
    seen: dict[tuple[bytes, int], bytes] = {}
    digests: dict[tuple[bytes, str], bytes] = {}
    for head in heads:
        key = (head.signer, head.counter)
        if key in seen and seen[key] != head.body:
            problems.append(f"fork: two different heads with counter {head.counter} signed by "
                            f"{rfmt.device_tag(head.signer)}")
        seen[key] = head.body
        for seg in head.segments:
            known = digests.setdefault((head.signer, seg.name), seg.digest)
            if known != seg.digest:
                problems.append(f"fork: head {head.counter} lists {seg.name} with another digest than an "
                                f"earlier head of {rfmt.device_tag(head.signer)}")
    return problems


def newest_head(heads: list[rfmt.Head], pinned_key: bytes | None, problems: list[str]) -> rfmt.Head | None:
    trusted = heads
    if pinned_key is not None:
        trusted = [h for h in heads if h.signer == pinned_key]
        for h in heads:
            if h.signer != pinned_key:
                problems.append(f"head {h.counter} is signed by {rfmt.device_tag(h.signer)}, not by the "
                                f"pinned key {rfmt.device_tag(pinned_key)}")
    elif len({h.signer for h in heads}) > 1:
        problems.append("heads are signed by several keys and none is pinned")
    return trusted[-1] if trusted else None


def verify_copy(path: str | os.PathLike, *, pinned_key: bytes | None = None) -> CopyReport:
    root = Path(path)
    report = CopyReport(str(root))
    heads = read_heads(root, report.problems)
    report.problems += fork_problems(heads)
    head = newest_head(heads, pinned_key, report.problems)
    if head is None:
        if not report.problems:
            report.problems.append("no head: nothing was replicated here yet")
        return report
    report.head, report.head_counter, report.signer = head, head.counter, head.signer
    report.segments = len(head.segments)
    for seg in head.segments:
        state = segment_state(root, seg)
        if state == "ok":
            report.present += 1
        else:
            (report.missing if state == "missing" else report.damaged).append(seg.name)
    keys = _read(root / rfmt.KEYS_FILE)
    if keys is None:
        report.missing.append(rfmt.KEYS_FILE)
    elif rfmt.file_digest(keys) != head.keys_digest:
        report.damaged.append(rfmt.KEYS_FILE)
    report.retired = [name for name in head.retired if (root / name).exists()]
    return report


def segment_state(root: Path, seg: rfmt.SegmentEntry) -> str:
    data = _read(root / seg.name)
    if data is None:
        return "missing"
    return "ok" if rfmt.file_digest(data) == seg.digest else "damaged"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
