"""`statefs vault ...`: the vault's command line, in restic's and borg's conventions.

    statefs vault init
    statefs vault backup PATH... [--exclude PATTERN]... [--tag TAG]...
    statefs vault snapshots | ls SNAPSHOT [PATH] | log PATH | diff SNAP1 SNAP2
    statefs vault restore SNAPSHOT[:PATH] --target DIR
    statefs vault forget --keep-last N --keep-daily N ... [--prune] | prune
    statefs vault check [--read-data]            (exit status as fsck(8))
    statefs vault key passwd | key export-recovery

The vault lives in the image statefsd serves ($STATEFS_SOCKET or --socket);
keystored ($STATEFS_KEYSTORE_SOCKET or --keystore-socket) opens it on a device
that joined it and signs snapshots. Elsewhere the passphrase
($STATEFS_VAULT_PASSPHRASE, --passphrase-file, or asked on a terminal) or the
recovery secret (--recovery-file) opens it. Every command takes --json.
This module only parses; the heavy imports happen when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from statefsd.errors import Code, FsckExit, InvalidArgument, KeyUnavailable, StateFSError, UsageError


# What to do next when statefsd's answer is about the image as a whole.
VAULT_HINTS = {
    Code.ENOSPC: "the vault's image is full; what this run stored is kept for a re-run. Free space with "
                 "`statefs vault forget --keep-... --prune` (or `statefs vault prune` after a failed backup), "
                 "or copy the vault to a larger image",
}


class _FsckParser(argparse.ArgumentParser):
    """check's usage errors exit 16, as fsck(8) says."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(int(FsckExit.USAGE), f"statefs vault check: {message}\n")


def secret_options() -> argparse.ArgumentParser:
    """The options that open a vault (also used by replication)."""
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--keystore-socket", default=os.environ.get("STATEFS_KEYSTORE_SOCKET"),
                      help="keystored socket (default: $STATEFS_KEYSTORE_SOCKET)")
    opts.add_argument("--passphrase-file", help="read the vault passphrase from this file "
                                                "(default: $STATEFS_VAULT_PASSPHRASE, or ask on a terminal)")
    opts.add_argument("--recovery-file", help="open the vault with the recovery secret in this file")
    opts.add_argument("--json", action="store_true", help="print the result as JSON")
    return opts


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    parents = [common, secret_options()]

    vault = sub.add_parser("vault", help="versioned, deduplicated, encrypted backups of files",
                           description="Back up files into the vault StateFS keeps in this image.")
    vs = vault.add_subparsers(dest="vault_command", required=True, metavar="COMMAND")
    vs.add_parser("init", parents=parents, help="create a vault in the image (needs a passphrase)")
    p = vs.add_parser("backup", parents=parents, help="back up files and directories as a new snapshot")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="skip paths or names matching this shell pattern (repeatable)")
    p.add_argument("--tag", action="append", default=[], help="tag the snapshot (repeatable)")
    vs.add_parser("snapshots", parents=parents, help="list the snapshots")
    p = vs.add_parser("ls", parents=parents, help="list the files of a snapshot")
    p.add_argument("snapshot", help='snapshot ID (a prefix is enough) or "latest"')
    p.add_argument("path", nargs="?", default="", help="only this path (as it was backed up)")
    p.add_argument("-l", dest="long", action="store_true", help="mode, size, time and path")
    p = vs.add_parser("log", parents=parents, help="every recorded version of one file")
    p.add_argument("path")
    p = vs.add_parser("diff", parents=parents, help="what changed between two snapshots (+ - M T U)")
    p.add_argument("snapshot1")
    p.add_argument("snapshot2")
    p = vs.add_parser("restore", parents=parents, help="restore a snapshot, or one path of it, into a directory")
    p.add_argument("snapshot", metavar="SNAPSHOT[:PATH]")
    p.add_argument("--target", required=True, help="directory to restore into (created if missing)")
    p = vs.add_parser("forget", parents=parents, help="forget snapshots by a retention policy")
    for period in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{period}", type=int, default=0, metavar="N")
    p.add_argument("--keep-tag", action="append", default=[], metavar="TAG")
    p.add_argument("--dry-run", action="store_true", help="say what would be forgotten, change nothing")
    p.add_argument("--prune", action="store_true", help="reclaim the space afterwards (no lock; backups go on)")
    vs.add_parser("prune", parents=parents, help="reclaim the space of data no snapshot uses")
    p = vs.add_parser("check", parents=parents, help="verify every snapshot from the stored data")
    p.__class__ = _FsckParser     # argparse builds every subparser from one class
    p.add_argument("--read-data", action="store_true", help="also read and verify every chunk")
    p = vs.add_parser("key", parents=parents, help="change the passphrase, or export a recovery secret")
    p.add_argument("key_command", choices=("passwd", "export-recovery"))
    p.add_argument("--new-passphrase-file", help="key passwd: read the new passphrase from this file "
                                                 "(default: $STATEFS_VAULT_NEW_PASSPHRASE, or ask)")


def refuse_extra(args: argparse.Namespace, extra: list[str]) -> None:
    if getattr(args, "vault_command", None) == "check":
        print(f"statefs vault check: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        sys.exit(int(FsckExit.USAGE))


def run(args: argparse.Namespace) -> int:
    command = args.vault_command
    try:
        return _COMMANDS[command](args)
    except StateFSError as exc:
        hint = VAULT_HINTS.get(exc.code, exc.hint)
        print(f"statefs vault {command}: {exc.code.name}: {exc.message} ({hint})", file=sys.stderr)
        return int(FsckExit.OPERATIONAL) if command == "check" else int(exc.code)
    except (KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as exc:
        if command != "check":
            raise            # statefs's main reports it as EINTERNAL
        print(f"statefs vault check: EINTERNAL: {type(exc).__name__}: {exc} (please report this bug)",
              file=sys.stderr)
        return int(FsckExit.OPERATIONAL)


# ------------------------------------------------------------------ opening

def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except OSError as exc:
        raise InvalidArgument(f"cannot read the {what} file {path}: {exc.strerror}",
                              hint="check the path and its permissions") from None


def secret_from_args(args, *, ask: bool):
    from statefsd.vault import keys as vkeys
    from statefsd.vault.vault import Secret
    if args.recovery_file:
        return Secret(recovery=vkeys.parse_recovery(_read_secret_file(args.recovery_file, "recovery")))
    if args.passphrase_file:
        return Secret(passphrase=_read_secret_file(args.passphrase_file, "passphrase"))
    if os.environ.get("STATEFS_VAULT_PASSPHRASE"):
        return Secret(passphrase=os.environ["STATEFS_VAULT_PASSPHRASE"])
    if ask and sys.stdin.isatty():
        import getpass
        return Secret(passphrase=getpass.getpass("vault passphrase: "))
    return Secret()


def device_from_args(args, required: bool):
    from statefsd.keystore import KeystoreSigner
    from statefsd.vault.vault import Device
    if not args.keystore_socket:
        if required:
            raise KeyUnavailable("this command signs with the device key, and no keystored was given",
                                 hint="start keystored and set $STATEFS_KEYSTORE_SOCKET (or --keystore-socket)")
        return None
    try:
        return Device(KeystoreSigner(args.keystore_socket))
    except StateFSError:
        if required:
            raise
        return None     # restore and check need only the passphrase


def _kv(args):
    from statefsd.client import Client
    from statefsd.vault.kv import ClientKV
    return ClientKV(Client(getattr(args, "socket", None)))


def open_from_args(args, *, device_required: bool = False):
    from statefsd.vault.vault import Secret, open_vault
    device = device_from_args(args, device_required)
    secret = secret_from_args(args, ask=device is None)
    kv = _kv(args)
    try:
        return open_vault(kv, secret, device, join=device_required)
    except KeyUnavailable:
        if secret == Secret() and sys.stdin.isatty():
            return open_vault(kv, secret_from_args(args, ask=True), device, join=device_required)
        raise


def _progress(args, description: str):
    from statefsd.vault.progress import Progress
    return Progress(None if args.json else sys.stderr, description)


def _emit(args, result, text: str) -> None:
    if args.json:
        print(json.dumps(result, default=_json_default))
    elif text:
        print(text)


def _json_default(value):
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _when(ns: int) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------ commands

def cmd_init(args) -> int:
    from statefsd.vault.vault import init
    secret = secret_from_args(args, ask=True)
    vault = init(_kv(args), secret, device_from_args(args, False))
    joined = vault.device.id if vault.device else None
    _emit(args, {"vault_id": vault.vault_id.hex(), "device": joined},
          f"created vault {vault.vault_id.hex()}" + (f"; device {joined} opens it without the passphrase"
                                                     if joined else "; no keystored: opens with the passphrase only"))
    return 0


def cmd_backup(args) -> int:
    from statefsd.vault.backup import Backup
    vault = open_from_args(args, device_required=True)
    result = Backup(vault, args.paths, excludes=args.exclude, tags=args.tag,
                    progress=_progress(args, "backup")).run()
    _emit(args, result,
          f"snapshot {result['snapshot'][:8]} saved: {result['files']} files, {_human(result['bytes'])} "
          f"({result['added']} added, {result['modified']} modified, {result['deleted']} deleted, "
          f"{result['unchanged_files']} unchanged); {_human(result['new_bytes'])} new data stored as "
          f"{_human(result['stored_bytes'])} in {result['seconds']} s")
    return 0


def _snapshot_json(snap: dict) -> dict:
    return {"id": snap["id"].hex(), "time": snap["time"], "host": snap["host"], "device": snap.get("device"),
            "paths": snap["paths"], "tags": snap.get("tags", []), "root": snap.get("root"),
            "parent": snap.get("parent"), "stats": snap.get("stats"),
            **({"forgotten": snap["forgotten"]} if snap.get("forgotten") else {})}


def cmd_snapshots(args) -> int:
    vault = open_from_args(args)
    snaps = vault.snapshots()
    lines = [f"{'ID':<10} {'Time':<19}  {'Host':<16} {'Tags':<12} Paths"]
    lines += [f"{s['id'].hex()[:8]:<10} {_when(s['time'])}  {s['host'][:16]:<16} {','.join(s.get('tags', []))[:12]:<12} "
              f"{' '.join(s['paths'])}" for s in snaps]
    _emit(args, [_snapshot_json(s) for s in snaps], "\n".join(lines) + f"\n{len(snaps)} snapshots")
    return 0


def cmd_ls(args) -> int:
    from statefsd.vault.compare import entry_json, listing
    vault = open_from_args(args)
    snap = vault.find_snapshot(args.snapshot)
    found = False
    for path, entry in listing(vault.objects(), snap["root"], os.fsencode(args.path)):
        found = True
        if args.json:
            print(json.dumps(entry_json(path, entry)))
        elif args.long:
            print(f"{oct(entry.mode)[2:]:>6} {entry.size:>12} {_when(entry.mtime_ns)} {os.fsdecode(path)}")
        else:
            print(os.fsdecode(path))
    if args.path and not found:
        from statefsd.errors import NotFound
        raise NotFound(f"{args.path!r} is not in snapshot {snap['id'].hex()[:8]}",
                       hint=f"list the snapshot with `statefs vault ls {snap['id'].hex()[:8]}`")
    return 0


def cmd_log(args) -> int:
    from statefsd.vault.history import file_log
    vault = open_from_args(args)
    events = file_log(vault, args.path)
    out = [{"time": e["time"], "op": e["op"], "snapshot": e["snapshot"].hex(), "device": e["device"],
            "size": e["size"], "mtime_ns": e["mtime_ns"], "forgotten": e["forgotten"]} for e in events]
    text = "\n".join(f"{_when(e['time'])}  {e['op']:<7} {e['size']:>12}  snapshot {e['snapshot'][:8]}"
                     + ("  (forgotten)" if e["forgotten"] else "") for e in out) or \
        f"no recorded version of {os.path.abspath(args.path)}"
    _emit(args, out, text)
    return 0


def cmd_diff(args) -> int:
    from statefsd.vault.compare import diff
    vault = open_from_args(args)
    a, b = vault.find_snapshot(args.snapshot1), vault.find_snapshot(args.snapshot2)
    changes = [(c, os.fsdecode(p)) for c, p in diff(vault.objects(), a["root"], b["root"])]
    _emit(args, [{"change": c, "path": p} for c, p in changes], "\n".join(f"{c}  {p}" for c, p in changes))
    return 0


def cmd_restore(args) -> int:
    from statefsd.vault.restore import Restore
    vault = open_from_args(args)
    ref, _, path = args.snapshot.partition(":")
    result = Restore(vault, vault.find_snapshot(ref), args.target, path, _progress(args, "restore")).run()
    text = (f"restored {result['files']} files, {_human(result['bytes'])} into {result['target']}")
    if result["damaged"] or result["failed"]:
        text += f"; NOT restored: {len(result['damaged'])} damaged, {len(result['failed'])} failed"
    _emit(args, result, text)
    if result["damaged"]:
        return int(Code.EINTEGRITY)
    return 0 if not result["failed"] else int(InvalidArgument.code)


def cmd_forget(args) -> int:
    from statefsd.vault.forget import Policy, choose, forget, prune
    vault = open_from_args(args)
    policy = Policy(args.keep_last, args.keep_hourly, args.keep_daily, args.keep_weekly, args.keep_monthly,
                    args.keep_yearly, tuple(args.keep_tag))
    keep, drop = choose(vault.snapshots(), policy)
    if not args.dry_run:
        for snap in drop:
            forget(vault, snap)
    result = {"keep": [s["id"].hex() for s in keep], "forget": [s["id"].hex() for s in drop],
              "dry_run": args.dry_run}
    if args.prune and not args.dry_run:
        result["prune"] = prune(vault, _progress(args, "prune"))
    _emit(args, result, f"{'would forget' if args.dry_run else 'forgot'} {len(drop)} snapshots, kept {len(keep)}"
          + (f"; pruned {result['prune']['collected_objects']} objects "
             f"({_human(result['prune']['freed_bytes'])})" if "prune" in result else ""))
    return 0


def cmd_prune(args) -> int:
    from statefsd.vault.forget import prune
    result = prune(open_from_args(args), _progress(args, "prune"))
    _emit(args, result, f"pruned {result['collected_objects']} objects ({_human(result['freed_bytes'])}); "
                        f"{result['left_for_running_backups']} left for running backups")
    return 0


def cmd_check(args) -> int:
    from statefsd.vault.check import Checker
    vault = open_from_args(args)
    result = Checker(vault, args.read_data, _progress(args, "check")).run(vault.kv.verify())
    text = (f"{result['snapshots']} snapshots, {result['nodes']} nodes, {result['chunks']} chunks checked"
            + (f", {_human(result['chunk_bytes_read'])} read" if args.read_data else "")
            + (": no problems" if not result["problems"] else
               "".join(f"\n  {p['where']}: {p['problem']}" for p in result["problems"])))
    _emit(args, result, text)
    return result["exit"]


def cmd_key(args) -> int:
    vault = open_from_args(args)
    if args.key_command == "export-recovery":
        secret = vault.export_recovery()
        _emit(args, {"recovery": secret}, secret)
        if not args.json:
            print("Keep this recovery secret offline: with it alone (--recovery-file FILE) the vault opens on "
                  "any machine. Any earlier recovery secret no longer works.", file=sys.stderr)
        return 0
    new = (_read_secret_file(args.new_passphrase_file, "new passphrase") if args.new_passphrase_file
           else os.environ.get("STATEFS_VAULT_NEW_PASSPHRASE"))
    if not new and sys.stdin.isatty():
        import getpass
        new = getpass.getpass("new vault passphrase: ")
        if new != getpass.getpass("again: "):
            raise UsageError("the two passphrases differ")
    if not new:
        raise UsageError("no new passphrase given",
                         hint="use --new-passphrase-file or $STATEFS_VAULT_NEW_PASSPHRASE")
    vault.set_passphrase(new)
    _emit(args, {"changed": True}, "passphrase changed (no data was re-encrypted)")
    return 0


_COMMANDS = {"init": cmd_init, "backup": cmd_backup, "snapshots": cmd_snapshots, "ls": cmd_ls, "log": cmd_log,
             "diff": cmd_diff, "restore": cmd_restore, "forget": cmd_forget, "prune": cmd_prune,
             "check": cmd_check, "key": cmd_key}
