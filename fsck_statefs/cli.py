"""fsck-statefs IMAGE [--repair] [--dry-run] [--json] [--keystore-socket PATH] [-v]

Checks a StateFS image without a daemon and exits with an fsck(8) status
(statefsd.errors.FsckExit): 0 clean, 1 errors corrected, 4 errors left
uncorrected, 8 operational error (cannot open, image held by statefsd, not a
StateFS image, key unavailable), 16 usage error. Torn tails and orphaned
transactions are what a power cut leaves: reported as notes, exit 0. When
both superblock slots are lost, --repair first rebuilds one (rebuild.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys

from statefsd.storage.blockdev import FileDevice
from statefsd.storage.image import KeyProvider, Signer
from statefsd.errors import Busy, DeviceIOError, FsckExit, StateFSError

from fsck_statefs import rebuild
from fsck_statefs.check import Progress, check, slot_table
from fsck_statefs.repair import blockers, plan, repair
from fsck_statefs.report import ERROR, Issue, Report


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit 2; fsck(8) says 16
        self.print_usage(sys.stderr)
        print(f"fsck-statefs: {message}", file=sys.stderr)
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fsck-statefs", description="Check (and optionally repair) a StateFS image. "
                "Needs no daemon; refuses an image that statefsd holds.",
                epilog="exit status (fsck(8)): 0 no errors (torn tails and orphaned transactions are "
                       "notes), 1 errors corrected, 4 errors left uncorrected, 8 operational error "
                       "(cannot open, image in use, not a StateFS image, key unavailable), 16 usage error")
    p.add_argument("image", help="image file or block device")
    p.add_argument("--repair", action="store_true",
                   help="rebuild the active log without corrupt or unauthenticated transactions; "
                        "rebuild lost superblocks from the identity copy and the log")
    p.add_argument("--dry-run", action="store_true", help="say what --repair would do and write nothing (with or without --repair)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--keystore-socket", metavar="PATH",
                   help="keystored socket: authenticate every sealed payload with the image key")
    p.add_argument("-v", "--verbose", action="store_true", help="also show scan rate and every note")
    return p


def run(image: str, *, repair_image: bool = False, dry_run: bool = False,
        key_provider: KeyProvider | None = None, signer: Signer | None = None,
        progress: Progress | None = None) -> Report:
    """Check (and with ``repair_image`` repair) ``image``; never raises a
    StateFSError: those become an operational error in the report. With
    ``signer`` (keystored's device key) checkpoints are verified, and a
    repair signs the log it rewrites."""
    writes = repair_image and not dry_run
    try:
        # The flock keeps statefsd out, so a read-only check may use the page
        # cache (readahead); a repair writes with O_DIRECT like statefsd.
        device = FileDevice(image, read_only=not writes, direct=writes)
    except StateFSError as exc:
        return _operational(image, exc)
    try:
        rebuilt = None
        if rebuild.slots_lost(device) and rebuild.looks_like_statefs(device):
            rebuilt = rebuild.plan_rebuild(device)
            if rebuilt.sb is None or not writes:
                return _lost_superblocks(device, rebuilt, repair_image or dry_run)
            rebuild.write_superblock(device, rebuilt.sb)
        # Checkpoints signed under a uuid the rebuild could not recover
        # would read as forged, and a repair would drop what follows them.
        trusted_uuid = rebuilt is None or rebuilt.identity
        device_key = signer.public_key if signer is not None and trusted_uuid else None
        checked = check(device, key_provider=key_provider, device_key=device_key, progress=progress)
        report = checked.report
        done = [f"done: {s}" for s in rebuilt.steps] + rebuilt.notes if rebuilt else []
        rebuild_issues = _rebuild_issues(rebuilt) if rebuilt else []
        report.issues[:0] = rebuild_issues
        if len(report.errors) == len(rebuild_issues):   # the log needs nothing
            report.exit_code = FsckExit.CORRECTED if rebuilt else FsckExit.CLEAN
            if repair_image or dry_run:
                report.repair = {"performed": bool(rebuilt), "planned": rebuilt.steps if rebuilt else [],
                                 "log": done or ["nothing to repair"]}
            return report
        report.exit_code = FsckExit.UNCORRECTED
        if not (repair_image or dry_run):
            return report
        blocked = blockers(checked)
        if blocked:
            report.repair = {"performed": bool(rebuilt), "planned": [], "blocked": blocked,
                             "log": done + [f"cannot repair: {b}" for b in blocked]}
            return report
        steps = plan(checked, signed=signer is not None)
        if dry_run:
            report.repair = {"performed": False, "dry_run": True, "planned": steps,
                             "log": [f"would {s}" for s in steps] + ["dry run: nothing written"]}
            return report
        report.repair = {"performed": False, "planned": steps, "log": []}
        _repair_and_recheck(device, checked, report, key_provider, signer)
        report.repair["log"][:0] = done
        return report
    except StateFSError as exc:
        return _operational(image, exc)
    finally:
        device.close()


def _rebuild_issues(rebuilt: rebuild.Rebuild) -> list[Issue]:
    """The findings a performed rebuild corrected (as far as anything can)."""
    source = "the identity copy and the log" if rebuilt.identity else "the log (no identity copy)"
    return [Issue(ERROR, "superblock", f"both superblock slots were lost; rebuilt from {source}", repairable=True)] + [
        Issue(ERROR, "superblock", f"lost in the rebuild: {loss}", repairable=True) for loss in rebuilt.losses]


def _lost_superblocks(device, rebuilt: rebuild.Rebuild, repairing: bool) -> Report:
    """The report when both slots are lost and nothing was written: what to
    run (a check), what --repair would write (--dry-run), or why nothing
    can be rebuilt."""
    report = Report(image=device.path, exit_code=FsckExit.UNCORRECTED)
    report.superblocks = slot_table(device)
    if rebuilt.sb is None:
        report.add(ERROR, "superblock", rebuilt.problem)
        if repairing:
            report.repair = {"performed": False, "planned": [], "blocked": [rebuilt.problem],
                             "log": [f"cannot repair: {rebuilt.problem}"]}
        return report
    source = "the identity copy and the log" if rebuilt.identity else "the log (there is no identity copy)"
    report.add(ERROR, "superblock", f"both superblock slots are lost; to rebuild the superblock from "
                                    f"{source}, run: fsck-statefs --repair {shlex.quote(device.path)}",
               repairable=True)
    for loss in rebuilt.losses:
        report.add(ERROR, "superblock", f"a rebuild cannot bring back: {loss}", repairable=True)
    if repairing:
        report.repair = {"performed": False, "dry_run": True, "planned": rebuilt.steps,
                         "log": [f"would {s}" for s in rebuilt.steps] + rebuilt.notes
                         + ["then check the log under the rebuilt superblock", "dry run: nothing written"]}
    return report


def _repair_and_recheck(device, checked, report: Report, key_provider, signer) -> None:
    events: list[dict] = []
    try:
        stats = repair(device, checked, audit=lambda event, **f: events.append({"event": event, **f}),
                       signer=signer)
    except (DeviceIOError, Busy):
        raise
    except StateFSError as exc:
        # Compaction writes only into the inactive region until its final
        # superblock write, so a failure leaves the image as it was.
        report.repair.update(error=str(exc), log=[f"repair failed, image unchanged: {exc}"])
        return
    report.repair.update(performed=True, compaction=stats, events=events,
                         log=[f"done: {s}" for s in report.repair["planned"]])
    # fsck re-checks its own work before claiming success.
    again = check(device, key_provider=key_provider,
                  device_key=signer.public_key if signer is not None else None).report
    report.repair["recheck"] = {"errors": len(again.errors), "notes": len(again.notes),
                                "findings": [i.line() for i in again.issues], "summary": again.summary,
                                "space": again.space}
    if again.errors:
        report.repair["log"].append(f"re-check still finds {len(again.errors)} errors")
        report.exit_code = FsckExit.UNCORRECTED
    else:
        report.repair["log"].append(f"re-check clean: {again.summary['keys']} keys in "
                                    f"{again.summary['committed_txns']} transactions")
        report.exit_code = FsckExit.CORRECTED


def _operational(image: str, exc: StateFSError) -> Report:
    message = str(exc)
    if isinstance(exc, Busy):
        message += " (statefsd holds an exclusive lock on the image while it runs; stop it first)"
    return Report(image=image, operational_error=message, exit_code=FsckExit.OPERATIONAL)


@contextlib.contextmanager
def _progress_bar(enabled: bool):
    """A rich progress bar on stderr, only when stderr is a terminal."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress as Bar, TransferSpeedColumn
    with Bar("scanning log", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
             console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("scan", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError:
        return FsckExit.USAGE
    except SystemExit as exc:  # --help
        return FsckExit.CLEAN if not exc.code else FsckExit.USAGE
    key_provider = signer = None
    try:
        if args.keystore_socket:
            from statefsd.keystore import KeystoreSigner, keystore_key_provider
            key_provider = keystore_key_provider(args.keystore_socket)
            signer = KeystoreSigner(args.keystore_socket)
        with _progress_bar(sys.stderr.isatty()) as progress:
            report = run(args.image, repair_image=args.repair, dry_run=args.dry_run,
                         key_provider=key_provider, signer=signer, progress=progress)
    except StateFSError as exc:  # keystored unreachable or refusing
        report = _operational(args.image, exc)
    except KeyboardInterrupt:
        print("fsck-statefs: interrupted", file=sys.stderr)
        return FsckExit.OPERATIONAL
    except Exception as exc:  # a bug: still no traceback, still an fsck(8) status
        print(f"fsck-statefs: internal error (please report): {type(exc).__name__}: {exc}", file=sys.stderr)
        return FsckExit.OPERATIONAL
    try:
        text = report.to_json() if args.json else report.to_text(args.verbose)
        if report.operational_error and not args.json:
            # The header line names the image first; the error follows it.
            head, _, text = text.partition("\n")
            print(head, flush=True)
        if report.operational_error:
            print(f"fsck-statefs: cannot check {args.image}: {report.operational_error}",
                  file=sys.stderr, flush=True)
        print(text, flush=True)
    except BrokenPipeError:  # e.g. piped into head: the reader left, the status still counts
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the way Python's docs advise
    return int(report.exit_code)


if __name__ == "__main__":
    sys.exit(main())
