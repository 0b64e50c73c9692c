"""Peers: friends' machines that hold a copy of the outbox through Syncthing.

The owner shares its outbox as a send-only folder ``statefs-<replica id>``
with each peer's device; the node program on the peer (``statefs-node``)
receives it, verifies it and sends back a report through a second folder,
``statefs-report-<replica id>-<first 7 characters of the node's device id>``,
which lands here in ``state_dir/peers/<NODE DEVICE ID>/report.json``. The
functions take everything they need as arguments; the command line wires
them to the local replica state.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone

from pathlib import Path

from statefsd.errors import InvalidArgument, NotFound
from statefsd.replica.syncthing import Syncthing
from statefsd.replica.verify import read_heads

FOLDER_PREFIX = "statefs-"
REPORT_PREFIX = "statefs-report-"
REPORT_FILE = "report.json"
# The only addresses Syncthing dials; None (or "dynamic") leaves finding the
# peer to discovery.
_ADDRESS = re.compile(r"^(tcp|tcp4|tcp6|quic|quic4|quic6|relay)://\S+$")
_REPLICA_ID = re.compile(r"^[0-9a-f]{16}$")


def outbox_folder_id(replica_id: str) -> str:
    return FOLDER_PREFIX + replica_id


def report_folder_id(replica_id: str, node_device_id: str) -> str:
    return f"{REPORT_PREFIX}{replica_id}-{node_device_id[:7]}"


def replica_id_of(folder_id: str) -> str | None:
    """The replica id of an outbox folder id, None for any other folder."""
    if folder_id.startswith(FOLDER_PREFIX) and not folder_id.startswith(REPORT_PREFIX):
        rid = folder_id[len(FOLDER_PREFIX):]
        if _REPLICA_ID.match(rid):
            return rid
    return None


def report_dir(state_dir: str, device_id: str) -> str:
    return os.path.join(state_dir, "peers", device_id)


def _check_replica_id(replica_id: str) -> None:
    if not _REPLICA_ID.match(replica_id or ""):
        raise InvalidArgument(f"replica id {replica_id!r} is not 16 lowercase hex digits",
                              hint="run 'statefs replicate init' to create the replica state")


def _check_address(address: str | None) -> str | None:
    if address in (None, "", "dynamic"):
        return None
    if not _ADDRESS.match(address):
        raise InvalidArgument(f"peer address {address!r} is not a Syncthing address",
                              hint="give it as tcp://HOST:PORT (Syncthing listens on 22000), or leave it "
                                   "out to find the peer by discovery")
    return address


def add_peer(st: Syncthing, device_id: str, address: str | None, outbox: str, replica_id: str,
             state_dir: str) -> str:
    """Adds the peer's device, shares the outbox with it (send-only) and
    accepts its node's reports (receive-only) into
    ``state_dir/peers/<DEVICE ID>``. Idempotent. Returns the device id in
    Syncthing's canonical form."""
    _check_replica_id(replica_id)
    address = _check_address(address)
    device_id = st.normalize_device_id(device_id)
    if device_id == st.device_id():
        raise InvalidArgument("that device id is this machine's own Syncthing",
                              hint="give the id shown by Syncthing on the peer's machine")
    if not os.path.isdir(outbox):
        raise NotFound(f"outbox {outbox} does not exist", hint="run 'statefs replicate init' first")
    st.add_device(device_id, address, name=f"statefs peer {device_id[:7]}")
    # Sharing takes effect on a live connection too (checked with 1.19.2: no
    # pause/resume of the device is needed, both for a new folder and for a
    # folder shared later with a connected device).
    st.add_folder(outbox_folder_id(replica_id), outbox, type="sendonly", devices=[device_id])
    reports = report_dir(state_dir, device_id)
    os.makedirs(reports, exist_ok=True)
    st.add_folder(report_folder_id(replica_id, device_id), reports, type="receiveonly", devices=[device_id])
    return device_id


def remove_peer(st: Syncthing, device_id: str, replica_id: str, state_dir: str) -> None:
    """Stops sharing the outbox with the peer and drops its report folder.
    The device itself is removed only when no other folder uses it (the
    user's Syncthing may share other things with that machine). The peer's
    last report stays in ``state_dir`` for the record."""
    _check_replica_id(replica_id)
    device_id = st.normalize_device_id(device_id)
    folder_id = outbox_folder_id(replica_id)
    if st.folder(folder_id) is not None:
        st.unshare_folder(folder_id, device_id)
    report_id = report_folder_id(replica_id, device_id)
    if st.folder(report_id) is not None:
        st.remove_folder(report_id)
    me = st.device_id()
    still_used = any(d["deviceID"] == device_id for f in st.folders() for d in f["devices"] if d["deviceID"] != me)
    if not still_used and st.device(device_id) is not None:
        st.remove_device(device_id)


def list_peers(st: Syncthing, replica_id: str) -> list[dict]:
    """The devices the outbox is shared with: ``device_id``, ``name``,
    ``address`` (None: discovery), ``paused``."""
    _check_replica_id(replica_id)
    folder = st.folder(outbox_folder_id(replica_id))
    if folder is None:
        return []
    me = st.device_id()
    devices = {d["deviceID"]: d for d in st.devices()}
    out = []
    for member in folder["devices"]:
        device_id = member["deviceID"]
        if device_id == me:
            continue
        device = devices.get(device_id, {})
        addresses = [a for a in device.get("addresses", []) if a != "dynamic"]
        out.append({"device_id": device_id, "name": device.get("name", ""),
                    "address": addresses[0] if addresses else None, "paused": bool(device.get("paused"))})
    return sorted(out, key=lambda p: p["device_id"])


def read_report(state_dir: str, device_id: str) -> dict | None:
    """The node's latest report as received, None when none arrived yet (or
    it is unreadable: a half-received file is retried on the next call)."""
    try:
        with open(os.path.join(report_dir(state_dir, device_id), REPORT_FILE), "rb") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _last_seen(stats: dict) -> float | None:
    """Syncthing's lastSeen (RFC 3339; the epoch when never seen) as a Unix time."""
    text = stats.get("lastSeen")
    if not text:
        return None
    try:
        seen = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if seen.year < 2000:
        return None
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=timezone.utc)
    return seen.timestamp()


def newest_head_counter(outbox: str | os.PathLike) -> int:
    """The counter of the newest valid head in the outbox (0: none yet)."""
    heads = read_heads(Path(outbox), [])
    return heads[-1].counter if heads else 0


def peer_status(st: Syncthing, outbox: str | os.PathLike, replica_id: str, state_dir: str | os.PathLike,
                outbox_head: int | None = None, *, now: float | None = None) -> list[dict]:
    """One dict per peer: what Syncthing knows (``connected``,
    ``last_seen`` (Unix time, None if never), ``completion`` %,
    ``need_bytes``/``need_items`` still to send) and what the peer's node
    last reported (``head_counter`` and ``head_digest`` of the newest head it
    verified, ``report``: damaged/missing counts, problems, when), judged
    against ``outbox_head``, the counter of the outbox's newest head (read
    from ``outbox`` when not given):

    - ``behind``: Syncthing has not yet sent everything to the peer;
    - ``stale``: everything is sent, but the node has not verified the newest
      head (no report yet, or its verified counter is older);
    - ``damaged``: the node reported damaged or missing files or problems
      (it repairs them by fetching them again; see statefs-node);
    - ``ok``: none of the above.
    """
    if outbox_head is None:
        outbox_head = newest_head_counter(outbox)
    now = time.time() if now is None else now
    folder_id = outbox_folder_id(replica_id)
    peers = list_peers(st, replica_id)
    if not peers:
        return []
    connections = st.connections()
    stats = st.device_stats()
    out = []
    for peer in peers:
        device_id = peer["device_id"]
        conn = connections.get(device_id, {})
        completion = st.completion(folder_id, device_id)
        connected = bool(conn.get("connected"))
        last_seen = now if connected else _last_seen(stats.get(device_id, {}))
        report = read_report(state_dir, device_id)
        summary = None
        if report is not None:
            summary = {
                "time": report.get("time"),
                "head_counter": int(report.get("head_counter") or 0),
                "signer": report.get("signer"),
                "segments": report.get("segments"),
                "present": report.get("present"),
                "missing": len(report.get("missing") or []),
                "damaged": len(report.get("damaged") or []),
                "problems": list(report.get("problems") or []),
            }
        # Syncthing 1.19 reports 100 % for a device that has not accepted
        # the folder (it has no index from it): only the node's report says
        # the copy is there, so without one the peer counts as stale.
        behind = completion.completion < 100.0 or completion.need_bytes > 0 or (last_seen is None)
        verified = summary["head_counter"] if summary else 0
        digest = report.get("head_digest") if report else None
        stale = not behind and verified < outbox_head
        damaged = bool(summary and (summary["missing"] or summary["damaged"] or summary["problems"]))
        out.append({
            **peer,
            "connected": connected,
            "last_seen": last_seen,
            "completion": completion.completion,
            "need_bytes": completion.need_bytes,
            "need_items": completion.need_items,
            "outbox_head": outbox_head,
            "head_counter": verified,
            "head_digest": digest,
            "report": summary,
            "behind": behind,
            "stale": stale,
            "damaged": damaged,
            "ok": not (behind or stale or damaged),
        })
    return out
