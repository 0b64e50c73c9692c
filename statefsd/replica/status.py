"""`statefs replicate status`: where every copy stands against this device,
and the external anchor: a copy holding a newer signed head than this
device, or one that diverges from it, means this device's history was
rolled back or forked (exit EROLLBACK, and an audit event)."""

from __future__ import annotations

import time
from pathlib import Path

from statefsd.errors import StateFSError
from statefsd.replica import config as rconfig
from statefsd.replica import format as rfmt
from statefsd.replica.outbox import head_txns, last_own_head
from statefsd.shared import audit as auditmod
from statefsd.vault import cli as vault_cli


def collect(args, config: rconfig.ReplicaConfig, state: Path) -> dict:
    vault = vault_cli.open_from_args(args, device_required=True)
    try:
        keys = rfmt.ReplicaKeys.derive(vault.keys)
        signer = vault.device.public_key       # copies are compared with this device's own heads
        head = last_own_head(rconfig.outbox(state), vault.device.public_key)
        local = {"head_counter": 0, "last_txn": 0, "pushed": None, "segments": 0}
        if head is not None:
            sealed = rfmt.open_head_state(keys, head)
            local.update(head_counter=head.counter, last_txn=sealed.last_txn, segments=len(head.segments),
                         pushed=sealed.time_ns / 1e9, head_digest=rfmt.file_digest(head.body).hex())
        newest_txn = int(vault.kv.client.info()["next_txn_id"]) - 1
    finally:
        vault.kv.close()
    report: dict = {"replica_id": config.replica_id, "image_newest_txn": newest_txn, "local": local,
                    "txns_not_pushed": max(0, newest_txn - local["last_txn"]), "peers": [], "remotes": [],
                    "rollback": [], "forks": [], "warnings": []}
    if head is not None and newest_txn < local["last_txn"]:
        report["rollback"].append(f"the image's newest txn {newest_txn} is older than txn {local['last_txn']} "
                                  f"this device already replicated (head {head.counter})")
    copies = []
    if config.peers and config.syncthing:
        from statefsd.replica import peers
        from statefsd.replica.cli import _syncthing
        try:
            report["peers"] = peers.peer_status(_syncthing(config), rconfig.outbox(state), config.replica_id,
                                                state, local["head_counter"])
        except StateFSError as exc:
            report["warnings"].append(f"Syncthing: {exc.code.name}: {exc.message} ({exc.hint})")
        copies += [("peer " + p["device_id"], p) for p in report["peers"]]
    if config.remotes:
        from statefsd.replica import remotes
        from statefsd.replica.cli import _rclone
        for name in config.remotes:
            try:
                r = remotes.remote_status(_rclone(state), name, state, signer=signer)
            except StateFSError as exc:
                r = {"name": name, "reachable": False, "error": f"{exc.code.name}: {exc.message}"}
            report["remotes"].append(r)
            copies.append(("remote " + name, r))
    held = 0
    reached = head_txns(rconfig.outbox(state))
    for label, copy in copies:
        counter = int(copy.get("head_counter") or 0)
        if counter > local["head_counter"]:
            report["rollback"].append(f"{label} holds head {counter}, newer than this device's head "
                                      f"{local['head_counter']}: this device's state was rolled back")
        digest = copy.get("head_digest")
        if counter and counter == local["head_counter"] and digest and digest != local.get("head_digest"):
            report["forks"].append(f"{label} holds another head {counter}: two histories under one device")
        if counter == local["head_counter"] and counter:
            held += 1
        copy["txns_behind"] = _txns_behind(copy, local, reached)
    report["copies_of_newest"] = held
    if held < config.copies:
        report["warnings"].append(f"under-replicated: {held} of {config.copies} wanted copies hold head "
                                  f"{local['head_counter']}")
    if report["rollback"] or report["forks"]:
        journal = auditmod.AuditLog(str(state / "audit.jsonl"), component="replica")
        journal.event("rollback_detected", rollback=report["rollback"], forks=report["forks"])
        journal.close()
    report["time"] = time.time()
    return report


def _txns_behind(copy: dict, local: dict, reached: dict[int, int]) -> int | None:
    counter = int(copy.get("head_counter") or 0)
    if counter not in reached:
        return None
    return max(0, local["last_txn"] - reached[counter])


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "never"


def render(report: dict) -> str:
    local = report["local"]
    lines = [f"replica {report['replica_id']}: head {local['head_counter']} up to txn {local['last_txn']}; "
             f"image at txn {report['image_newest_txn']} ({report['txns_not_pushed']} txns not pushed)"]
    for p in report["peers"]:
        lines.append(f"peer {p['device_id'][:7]}: connected={p.get('connected')} last seen {_when(p.get('last_seen'))} "
                     f"completion {p.get('completion')}% behind {p.get('need_bytes')} bytes, "
                     f"head {p.get('head_counter')}" + (" STALE" if p.get("stale") else ""))
    for r in report["remotes"]:
        lines.append(f"remote {r['name']}: " + (f"head {r.get('head_counter')}, {r.get('files')} files, "
                                                f"{r.get('bytes')} bytes" if r.get("reachable", True)
                                                else f"unreachable ({r.get('error')})"))
    lines.append(f"copies of the newest head: {report['copies_of_newest']}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    lines += [f"ROLLBACK: {r}" for r in report["rollback"]]
    lines += [f"FORK: {f}" for f in report["forks"]]
    return "\n".join(lines)
