"""`statefs replicate ...`, `statefs peer ...`, `statefs remote ...` and
`statefs restore`: replication's command line (docs/DESIGN.md, "Replication")."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from statefsd.errors import (InvalidArgument, PeerUnavailable, RolledBack, StateFSError, UsageError)
from statefsd.replica import config as rconfig
from statefsd.replica import format as rfmt
from statefsd.vault import cli as vault_cli


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state", help="replication state directory (default: $STATEFS_REPLICA_DIR, "
                                       "else ./var/replica)")
    parents = [common, vault_cli.secret_options(), state]

    rep = sub.add_parser("replicate", help="sealed copies of this image on peers and remotes",
                         description="Replicate the image's committed history as sealed segments and "
                                     "signed heads, carried by Syncthing (peers) and rclone (remotes).")
    rs = rep.add_subparsers(dest="replicate_command", required=True, metavar="COMMAND")
    p = rs.add_parser("init", parents=parents, help="set up replication for this image")
    p.add_argument("--segment-size", default="1M", help="size of every segment file (default 1M)")
    p.add_argument("--keep-generations", type=int, default=2,
                   help="whole histories kept since the last compactions (default 2)")
    p.add_argument("--copies", type=int, default=2, help="copies of the newest head wanted (default 2)")
    p.add_argument("--syncthing-url", help="this device's Syncthing REST address, e.g. http://127.0.0.1:8384")
    p.add_argument("--syncthing-api-key", help="its API key")
    p.add_argument("--syncthing-home", help="or: Syncthing's home directory (its config.xml names both)")
    rs.add_parser("push", parents=parents, help="write new segments and a signed head, then send them")
    p = rs.add_parser("run", parents=parents, help="push on every commit (or on a schedule), until stopped")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks at the image (default 1)")
    p.add_argument("--schedule", type=float, default=0.0,
                   help="push at most this often, in seconds (default: on every commit)")
    p.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    rs.add_parser("status", parents=parents, help="per peer and remote: last seen, behind, copies; "
                                                  "rollback and fork detection (exit 29)")

    peer = sub.add_parser("peer", help="friends' machines that hold sealed copies (Syncthing)")
    ps = peer.add_subparsers(dest="peer_command", required=True, metavar="COMMAND")
    p = ps.add_parser("add", parents=parents, help="share the replica with a Syncthing device")
    p.add_argument("device_id")
    p.add_argument("address", nargs="?", help="e.g. tcp://192.0.2.7:22000 (default: dynamic)")
    ps.add_parser("ls", parents=parents, help="list peers")
    p = ps.add_parser("rm", parents=parents, help="stop sharing with a peer")
    p.add_argument("device_id")

    remote = sub.add_parser("remote", help="untrusted storage that holds sealed copies (rclone)")
    rms = remote.add_subparsers(dest="remote_command", required=True, metavar="COMMAND")
    p = rms.add_parser("add", parents=parents, help="add an rclone remote, e.g. :sftp,host=...:path")
    p.add_argument("name")
    p.add_argument("spec")
    rms.add_parser("ls", parents=parents, help="list remotes")
    p = rms.add_parser("rm", parents=parents, help="forget a remote (its files stay)")
    p.add_argument("name")

    p = sub.add_parser("restore", parents=parents, help="a new image from copies on peers or remotes",
                       description="Build a new image from replica copies, verified end to end, with "
                                   "only the vault passphrase or recovery secret.")
    p.add_argument("--from", dest="sources", action="append", required=True, metavar="PEER_DIR|REMOTE",
                   help="a copy: a directory, a remote name from `statefs remote ls`, or an rclone "
                        "remote spec (repeat to use several copies)")
    p.add_argument("--at", help="a txn id or a vault snapshot ID (default: the newest state); "
                                "txn:N or snapshot:ID when an ID could be read as either")
    p.add_argument("--image", required=True, help="the new image file to write")
    p.add_argument("--size", help="image size (default: from the replica's size)")


def run(args: argparse.Namespace) -> int:
    name = {"replicate": f"replicate {getattr(args, 'replicate_command', '')}",
            "peer": f"peer {getattr(args, 'peer_command', '')}",
            "remote": f"remote {getattr(args, 'remote_command', '')}",
            "restore": "restore"}[args.command]
    try:
        if args.command == "replicate":
            return _REPLICATE[args.replicate_command](args)
        if args.command == "peer":
            return _PEER[args.peer_command](args)
        if args.command == "remote":
            return _REMOTE[args.remote_command](args)
        return cmd_restore(args)
    except StateFSError as exc:
        print(f"statefs {name}: {exc.code.name}: {exc.message} ({exc.hint})", file=sys.stderr)
        return int(exc.code)


def _emit(args, result: dict, text: str) -> None:
    if args.json:
        print(json.dumps(result, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)))
    elif text:
        print(text)


def _state(args) -> Path:
    return rconfig.state_dir(args.state)


# ------------------------------------------------------------------ replicate

def cmd_init(args) -> int:
    from statefsd.storage.blockdev import parse_size
    from statefsd.vault import vault as vaultmod

    state = _state(args)
    if (state / rconfig.CONFIG_NAME).exists():
        raise InvalidArgument(f"replication is already set up in {state}", hint="use it, or pick another --state")
    kv = vault_cli._kv(args)
    if vaultmod.kvmod.get(kv, vaultmod.rec.CONFIG_KEY) is None:
        # Replicas are sealed with the vault's keys: an image without a vault
        # gets its key slots (and nothing else) so its passphrase opens copies.
        vault = vaultmod.init(kv, vault_cli.secret_from_args(args, ask=True), vault_cli.device_from_args(args, True))
    else:
        vault = vault_cli.open_from_args(args, device_required=True)
    policy = {"copies": args.copies, "segment_bytes": parse_size(args.segment_size),
              "keep_generations": args.keep_generations}
    config = rconfig.ReplicaConfig(replica_id=rfmt.ReplicaKeys.derive(vault.keys).replica_id.hex(),
                                   socket=getattr(args, "socket", None), policy=policy)
    config.push_policy().check()
    if args.syncthing_home:
        from statefsd.replica.syncthing import read_home
        url, key = read_home(args.syncthing_home)
        config.syncthing = {"url": url, "api_key": key}
    elif args.syncthing_url:
        config.syncthing = {"url": args.syncthing_url, "api_key": args.syncthing_api_key or ""}
    rconfig.save(state, config)
    rconfig.outbox(state).mkdir(parents=True, exist_ok=True)
    _emit(args, {"state": str(state), "replica_id": config.replica_id, "policy": policy},
          f"replication set up in {state} (replica {config.replica_id}); "
          f"next: `statefs peer add` / `statefs remote add`, then `statefs replicate push`")
    return 0


def push_once(args, config: rconfig.ReplicaConfig, state: Path) -> dict:
    """Write what is new into the outbox, then hand it to every engine."""
    from statefsd.replica import outbox as outboxmod

    vault = vault_cli.open_from_args(args, device_required=True)
    outbox = rconfig.outbox(state)
    policy = config.push_policy()
    # One push at a time, the engines' uploads included: two would race to
    # upload and to delete what a head retires on the same remote.
    with outboxmod.exclusive_push(outbox):
        try:
            result = outboxmod.push_locked(vault.kv.client, vault, outbox, policy).as_dict()
        finally:
            vault.kv.close()
        result["engines"] = _send(config, state)
    return result


def _send(config: rconfig.ReplicaConfig, state: Path) -> dict:
    """Syncthing is told to rescan; each remote gets the new files. An engine
    that fails is reported; the outbox is complete either way."""
    sent: dict = {}
    if config.syncthing and config.peers:
        try:
            _syncthing(config).scan(_folder_id(config))
            sent["syncthing"] = "scanned"
        except StateFSError as exc:
            sent["syncthing"] = f"{exc.code.name}: {exc.message}"
    if config.remotes:
        from statefsd.replica import remotes
        rclone = _rclone(state)
        for name in config.remotes:
            try:
                sent[name] = remotes.push(rclone, rconfig.outbox(state), name)
            except StateFSError as exc:
                sent[name] = {"error": exc.code.name, "message": exc.message, "hint": exc.hint}
    return sent


def cmd_push(args) -> int:
    state = _state(args)
    config = rconfig.load(state)
    result = push_once(args, config, state)
    failed = [n for n, r in result["engines"].items() if isinstance(r, dict) and "error" in r]
    text = (f"head {result['counter']}: {result['txns']} txns, {result['segments_written']} segments "
            f"({result['bytes_written']} bytes) written, up to txn {result['last_txn']}")
    for n in failed:
        r = result["engines"][n]
        text += f"\n{n}: {r['error']}: {r['message']} ({r['hint']})"
    _emit(args, result, text)
    return int(PeerUnavailable.code) if failed else 0


def cmd_run(args) -> int:
    """Push whenever the image has committed something new (or on a
    schedule); one failing engine never stops the others or this loop."""
    from statefsd.client import Client

    state = _state(args)
    config = rconfig.load(state)
    seen, last_push = None, 0.0
    while True:
        with Client(getattr(args, "socket", None)) as client:
            newest = client.info()["next_txn_id"]
        due = time.monotonic() - last_push >= args.schedule
        if newest != seen and due:
            result = push_once(args, config, state)
            seen, last_push = newest, time.monotonic()
            print(json.dumps({"time": time.time(), **result}, default=str), flush=True)
        if args.once:
            return 0
        time.sleep(args.interval)


def cmd_status(args) -> int:
    from statefsd.replica import status as statusmod

    state = _state(args)
    config = rconfig.load(state)
    report = statusmod.collect(args, config, state)
    _emit(args, report, statusmod.render(report))
    if report["rollback"] or report["forks"]:
        return int(RolledBack.code)
    return 0


# ------------------------------------------------------------------ peers and remotes

def _syncthing(config: rconfig.ReplicaConfig):
    from statefsd.replica.syncthing import Syncthing
    if not config.syncthing:
        raise InvalidArgument("no Syncthing is configured for this replica",
                              hint="run `statefs replicate init --syncthing-url URL --syncthing-api-key KEY` "
                                   "in a new --state, or add them to replica.json")
    return Syncthing(config.syncthing["url"], config.syncthing["api_key"])


def _folder_id(config: rconfig.ReplicaConfig) -> str:
    return f"statefs-{config.replica_id}"


def _rclone(state: Path):
    from statefsd.replica.rclone import Rclone
    return Rclone.for_state(state)


def cmd_peer_add(args) -> int:
    from statefsd.replica import peers
    state = _state(args)
    config = rconfig.load(state)
    device_id = peers.add_peer(_syncthing(config), args.device_id, args.address, rconfig.outbox(state),
                               config.replica_id, state)
    config.peers[device_id] = {"address": args.address, "added": time.time()}
    rconfig.save(state, config)
    _emit(args, {"peer": device_id}, f"sharing the replica with {device_id}")
    return 0


def cmd_peer_ls(args) -> int:
    config = rconfig.load(_state(args))
    _emit(args, {"peers": config.peers},
          "\n".join(f"{d}  {p.get('address') or 'dynamic'}" for d, p in config.peers.items()))
    return 0


def cmd_peer_rm(args) -> int:
    from statefsd.replica import peers
    state = _state(args)
    config = rconfig.load(state)
    args.device_id = _syncthing(config).normalize_device_id(args.device_id)
    if args.device_id not in config.peers:
        raise InvalidArgument(f"{args.device_id} is not a peer of this replica", hint="see `statefs peer ls`")
    peers.remove_peer(_syncthing(config), args.device_id, config.replica_id, state)
    del config.peers[args.device_id]
    rconfig.save(state, config)
    _emit(args, {"removed": args.device_id}, f"no longer sharing with {args.device_id} (its copy stays)")
    return 0


def cmd_remote_add(args) -> int:
    from statefsd.replica import remotes
    state = _state(args)
    config = rconfig.load(state)
    remotes.add_remote(_rclone(state), args.name, args.spec, state)
    config.remotes[args.name] = {"added": time.time()}
    rconfig.save(state, config)
    _emit(args, {"remote": args.name}, f"remote {args.name} added; `statefs replicate push` sends to it")
    return 0


def cmd_remote_ls(args) -> int:
    config = rconfig.load(_state(args))
    _emit(args, {"remotes": config.remotes}, "\n".join(config.remotes))
    return 0


def cmd_remote_rm(args) -> int:
    from statefsd.replica import remotes
    state = _state(args)
    config = rconfig.load(state)
    if args.name not in config.remotes:
        raise InvalidArgument(f"no remote {args.name!r}", hint="see `statefs remote ls`")
    remotes.remove_remote(_rclone(state), args.name, state)
    del config.remotes[args.name]
    rconfig.save(state, config)
    _emit(args, {"removed": args.name}, f"remote {args.name} forgotten (its files stay)")
    return 0


# ------------------------------------------------------------------ restore

def cmd_restore(args) -> int:
    from statefsd.replica import restore as restoremod
    from statefsd.storage.blockdev import parse_size

    secret = vault_cli.secret_from_args(args, ask=True)
    with tempfile.TemporaryDirectory(prefix="statefs-restore-") as tmp:
        sources = [_source(args, src, Path(tmp) / str(i)) for i, src in enumerate(args.sources)]
        opened = restoremod.open_replica(sources, secret)
        target = restoremod.choose(opened, args.at)
        result = restoremod.restore(opened, target, args.image, size=parse_size(args.size) if args.size else None)
    text = (f"restored {result['image']}: {result['keys']} keys at txn {result['txn']} "
            f"(head {result['head']}, generation {result['generation']})")
    for label in result["stale_copies"]:
        text += f"\nstale copy: {label} holds an older head than head {result['head']}"
    for event in result["fetched_elsewhere"]:
        text += f"\nread from another copy: {event}"
    _emit(args, result, text)
    return 0


def _source(args, src: str, scratch: Path) -> tuple[Path, str]:
    if Path(src).is_dir():
        return Path(src), src
    if ":" not in src:
        state = _state(args)
        config = rconfig.load(state)
        if src not in config.remotes:
            raise UsageError(f"{src!r} is neither a directory nor a remote of {state}",
                             hint="pass a copy's directory, a name from `statefs remote ls`, or an rclone spec")
    from statefsd.replica import remotes
    remotes.pull(_rclone(_state(args)), src, scratch)
    return scratch, src


_REPLICATE = {"init": cmd_init, "push": cmd_push, "run": cmd_run, "status": cmd_status}
_PEER = {"add": cmd_peer_add, "ls": cmd_peer_ls, "rm": cmd_peer_rm}
_REMOTE = {"add": cmd_remote_add, "ls": cmd_remote_ls, "rm": cmd_remote_rm}
