"""What fsck found: findings, the report, and its two renderings (human and
one JSON document). Nothing here reads the image."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from statefsd.errors import FsckExit

ERROR = "error"   # the image is damaged: exit 4 unless repaired
NOTE = "note"     # worth knowing, normal after a power cut: exit 0


@dataclass
class Issue:
    severity: str           # ERROR or NOTE
    kind: str               # corruption, integrity, orphan, torn-tail, superblock, ...
    reason: str
    offset: int = -1        # byte offset on the device (-1: not tied to a record)
    record: str = ""        # record type at the offset ("" when unknown or not a record)
    txn_id: int = 0
    repairable: bool = False

    def line(self) -> str:
        where = f"offset {self.offset}" if self.offset >= 0 else "image"
        what = " ".join(p for p in (self.record, f"txn {self.txn_id}" if self.txn_id else "") if p)
        return f"{self.severity.upper():5} {self.kind:12} {where}{' ' + what if what else ''}: {self.reason}"


@dataclass
class Report:
    image: str
    issues: list[Issue] = field(default_factory=list)
    superblocks: list[dict] = field(default_factory=list)   # one per slot
    superblock: dict = field(default_factory=dict)          # the active one
    authentication: str = "not-applicable"                  # verified | skipped | not-applicable
    summary: dict = field(default_factory=dict)             # replay summary
    space: dict = field(default_factory=dict)
    scan: dict = field(default_factory=dict)                # bytes, seconds, MB/s
    repair: dict | None = None
    operational_error: str = ""
    exit_code: int = FsckExit.CLEAN

    def add(self, severity: str, kind: str, reason: str, **kw) -> Issue:
        issue = Issue(severity, kind, reason, **kw)
        self.issues.append(issue)
        return issue

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == ERROR]

    @property
    def notes(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == NOTE]

    def status(self) -> str:
        return {FsckExit.CLEAN: "clean", FsckExit.CORRECTED: "corrected",
                FsckExit.UNCORRECTED: "errors", FsckExit.OPERATIONAL: "operational-error",
                FsckExit.USAGE: "usage-error"}[FsckExit(self.exit_code)]

    def as_dict(self) -> dict:
        return {
            "image": self.image, "status": self.status(), "exit_code": int(self.exit_code),
            "operational_error": self.operational_error or None,
            "errors": len(self.errors), "notes": len(self.notes),
            "findings": [asdict(i) for i in self.issues],
            "superblocks": self.superblocks, "superblock": self.superblock,
            "authentication": self.authentication, "summary": self.summary,
            "space": self.space, "scan": self.scan, "repair": self.repair,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    def to_text(self, verbose: bool = False) -> str:
        out = [f"fsck-statefs: {self.image}"]
        for slot in self.superblocks:
            state = (f"generation {slot['generation']}" if slot["valid"] else f"INVALID ({slot['problem']})")
            out.append(f"  superblock slot {slot['slot']}: {state}{'  [active]' if slot['active'] else ''}")
        sb = self.superblock
        if sb:
            out.append(f"  format {sb['format']}, encryption {sb['encryption']}, active region "
                       f"{sb['active_region']}, log epoch {sb['log_epoch']}, txn ids reserved through "
                       f"{sb['txn_reserved']}")
        if self.summary:
            s = self.summary
            out.append(f"  log: {s['records']} records, {s['committed_txns']} committed transactions, "
                       f"{s['keys']} live keys, highest txn id {s['max_txn_id']}")
        if self.authentication == "skipped":
            out.append(f"  authentication SKIPPED: no key given, {self.summary.get('unverified_chunks', 0)} "
                       f"sealed chunks not verified (pass --keystore-socket)")
        elif self.authentication == "verified":
            out.append("  authentication: every sealed chunk of the log checked with the image key")
        if self.space:
            sp = self.space
            out.append(f"  space: log {sp['log_used']} of {sp['log_size']} bytes used, {sp['log_free']} free; "
                       f"{sp['live_keys']} keys, {sp['live_bytes']} live value bytes")
        if verbose and self.scan:
            out.append(f"  scan: {self.scan['bytes']} bytes in {self.scan['seconds']:.3f} s "
                       f"({self.scan['mb_per_s']:.0f} MB/s)")
        for issue in self.issues:
            if verbose or issue.severity == ERROR or issue.kind != "aborted":
                out.append("  " + issue.line())
        if self.repair is not None:
            out.extend("  repair: " + line for line in self.repair.get("log", []))
        out.append(f"{self.image}: {self.status()} ({len(self.errors)} errors, {len(self.notes)} notes), "
                   f"exit {int(self.exit_code)}")
        return "\n".join(out)
