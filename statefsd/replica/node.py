"""statefs-node: keeps a verified copy of a friend's outbox, beside Syncthing.

Runs on the peer's machine next to its Syncthing instance and never needs
the owner's vault key (a peer holds only sealed files). It

- adds the owner's device and accepts, receive-only and with deletes
  ignored, every folder ``statefs-<replica id>`` the owner offers, into
  ``STORE/<folder id>``;
- each round verifies each copy (signatures, digests) with the owner's
  signing key pinned on the first verified head (trust on first use, kept in
  ``STORE/node.json``; a head signed by another key is reported, never
  trusted);
- repairs: a damaged file is moved out to ``STORE/quarantine`` and, like a
  missing one or a wiped store, fetched again from the owner by reverting the
  receive-only folder;
- deletes only the segments a verified head retires (a peer never deletes on
  its own);
- writes ``report.json`` into its report folder
  ``statefs-report-<replica id>-<7 chars of its device id>``, shared back
  (send-only) with the owner, who reads it in ``statefs replicate status``.

``--share-with DEVICE_ID`` also shares the copies with another device, e.g. a
fresh machine of the owner restoring from this peer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from statefsd.errors import InternalError, InvalidArgument, PeerUnavailable, StateFSError, UsageError
from statefsd.replica import format as rfmt
from statefsd.replica import peers
from statefsd.replica.syncthing import MARKER, Syncthing, read_home
from statefsd.replica.verify import read_heads, verify_copy

NODE_FILE = "node.json"
QUARANTINE = "quarantine"


def _write_json(path: str, value: dict) -> None:
    """Written to a temporary name and renamed: Syncthing (or a reader)
    never picks up half a file."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Node:
    """One peer's copies of one owner's outboxes, driven through ``st``."""

    def __init__(self, st: Syncthing, owner: str, store: str, *, owner_address: str | None = None,
                 share_with: tuple[str, ...] = ()) -> None:
        self.st = st
        self.store = os.path.abspath(store)
        self.owner_raw, self.owner_address = owner, owner_address
        self.share_with_raw = tuple(share_with)
        self.owner = self.me = ""
        self.share_with: list[str] = []
        self.state: dict = {}

    # -- set-up ------------------------------------------------------------
    def setup(self) -> None:
        """Adds the owner's device (and --share-with devices); loads node.json."""
        os.makedirs(self.store, exist_ok=True)
        self.owner = self.st.normalize_device_id(self.owner_raw)
        self.me = self.st.device_id()
        if self.owner == self.me:
            raise InvalidArgument("--owner is this machine's own Syncthing device id",
                                  hint="give the device id of the owner's Syncthing")
        self.state = self._load_state()
        if self.state.get("owner") not in (None, self.owner):
            raise InvalidArgument(f"{self.store} holds copies of another owner ({self.state['owner']})",
                                  hint="give each owner its own --store directory")
        self.state["owner"] = self.owner
        self.state.setdefault("pinned", {})
        self._save_state()
        self.st.add_device(self.owner, self.owner_address, name=f"statefs owner {self.owner[:7]}")
        self.share_with = [self.st.normalize_device_id(d) for d in self.share_with_raw]
        for device in self.share_with:
            self.st.add_device(device, None, name=f"statefs restore {device[:7]}")

    def _load_state(self) -> dict:
        try:
            with open(os.path.join(self.store, NODE_FILE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise InvalidArgument(f"{os.path.join(self.store, NODE_FILE)} is not valid JSON: {exc}",
                                  hint="restore it from a backup, or remove it to pin the owner's key "
                                       "again on the next verified head") from None

    def _save_state(self) -> None:
        _write_json(os.path.join(self.store, NODE_FILE), self.state)

    def copies(self) -> list[str]:
        """The owner's outbox folders kept in this store (the same Syncthing
        may keep other owners' copies in other stores)."""
        return sorted(f["id"] for f in self.st.folders()
                      if peers.replica_id_of(f["id"]) and any(d["deviceID"] == self.owner for d in f["devices"])
                      and os.path.normpath(f["path"]) == os.path.join(self.store, f["id"]))

    def accept_offers(self) -> list[str]:
        """Accepts the owner's pending outbox folders; returns their ids.
        Syncthing only learns a folder's id when the owner shares it, so
        this runs every round."""
        accepted = []
        for folder_id, offered_by in self.st.pending_folders(self.owner).items():
            if self.owner in offered_by and peers.replica_id_of(folder_id):
                self._configure(folder_id)
                accepted.append(folder_id)
        for folder_id in self.copies():
            self._configure(folder_id)   # --share-with given later, report folder lost
        return accepted

    def _configure(self, folder_id: str) -> None:
        path = os.path.join(self.store, folder_id)
        folder = self.st.folder(folder_id)
        members = {d["deviceID"] for d in folder["devices"]} if folder else set()
        want = {self.owner, *self.share_with}
        if folder is None or not want <= members:
            self.st.add_folder(folder_id, path, type="receiveonly", devices=sorted(want), ignore_delete=True)
        report_id = peers.report_folder_id(peers.replica_id_of(folder_id), self.me)
        if self.st.folder(report_id) is None:
            report_path = os.path.join(self.store, report_id)
            os.makedirs(report_path, exist_ok=True)
            self.st.add_folder(report_id, report_path, type="sendonly", devices=[self.owner])

    # -- one round ---------------------------------------------------------
    def round(self) -> list[dict]:
        """Accepts offers, then verifies, repairs and reports every copy."""
        if not os.path.exists(os.path.join(self.store, NODE_FILE)):
            os.makedirs(self.store, exist_ok=True)
            self._save_state()      # the store was wiped: keep the pinned keys
        self.accept_offers()
        return [self.check(folder_id) for folder_id in self.copies()]

    def check(self, folder_id: str) -> dict:
        path = os.path.join(self.store, folder_id)
        actions: list[str] = []
        if not os.path.isdir(os.path.join(path, MARKER)):
            # The store was wiped (or never created): Syncthing stopped the
            # folder ("folder marker missing"); recreate it and fetch all again.
            os.makedirs(os.path.join(path, MARKER), exist_ok=True)
            actions.append("reseed")
        pinned_hex = self.state["pinned"].get(folder_id)
        pinned = bytes.fromhex(pinned_hex) if pinned_hex else None
        report = verify_copy(path, pinned_key=pinned)
        if pinned is None and report.head is not None and not report.problems:
            # Trust on first use: the key that signed the first clean head is
            # the owner's from now on; heads signed by any other are reported.
            pinned = report.signer
            self.state["pinned"][folder_id] = pinned.hex()
            self._save_state()
        retired_applied = []
        if pinned is not None and report.signer == pinned and not report.problems:
            # Only a clean copy's newest head, signed by the pinned key, may
            # delete: forks, forged or foreign heads stop all deletion.
            retired_applied = [rel for rel in report.retired if self._remove(path, rel)]
        damaged = list(report.damaged) + self._damaged_heads(path)
        for rel in damaged:
            self._quarantine(folder_id, path, rel)
        if damaged:
            actions.append("refetch-damaged")
        need = self._local_need(folder_id)
        if report.missing and not need:
            # Syncthing thinks it has everything, so these were lost here
            # (while it still pulls, a head may simply arrive before its
            # segments).
            actions.append("refetch-missing")
        if actions:
            self._resync(folder_id)
        result = {
            "node": self.me,
            "owner": self.owner,
            "folder": folder_id,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "head_counter": report.head_counter,
            "head_digest": rfmt.file_digest(report.head.body).hex() if report.head else None,
            "signer": report.signer.hex() if report.signer else None,
            "pinned": pinned.hex() if pinned else None,
            "segments": report.segments,
            "present": report.present,
            "missing": sorted(report.missing),
            "damaged": sorted(damaged),
            "retired_applied": sorted(retired_applied),
            "problems": report.problems,
            "actions": actions,
            "need_bytes": need,
        }
        report_id = peers.report_folder_id(peers.replica_id_of(folder_id), self.me)
        report_path = os.path.join(self.store, report_id)
        # Syncthing stops a folder whose marker is gone: recreate it too.
        os.makedirs(os.path.join(report_path, MARKER), exist_ok=True)
        _write_json(os.path.join(report_path, peers.REPORT_FILE), result)
        self._try_scan(report_id)
        return result

    @staticmethod
    def _damaged_heads(root: str) -> list[str]:
        """Head files with a head's name that do not decode or verify (a
        bit flip in a head is not noticed by Syncthing's rescan either):
        fetched again like a damaged segment."""
        head_dir = os.path.join(root, rfmt.HEAD_DIR)
        named = {f"{rfmt.HEAD_DIR}/{n}" for n in (os.listdir(head_dir) if os.path.isdir(head_dir) else ())}
        named = {rel for rel in named if rfmt.parse_head_name(rel)}
        if not named:
            return []
        good = {rfmt.head_name(h.signer, h.counter) for h in read_heads(Path(root), [])}
        return sorted(named - good)

    def _remove(self, root: str, rel: str) -> bool:
        target = self._inside(root, rel)
        try:
            os.remove(target)
            return True
        except FileNotFoundError:
            return False

    def _quarantine(self, folder_id: str, root: str, rel: str) -> None:
        """Moves a damaged file out of the synced folder (kept, never
        deleted: it may help a post-mortem); Syncthing then sees it as
        missing and the revert fetches a good copy."""
        source = self._inside(root, rel)
        target = os.path.join(self.store, QUARANTINE, folder_id, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            pass

    @staticmethod
    def _inside(root: str, rel: str) -> str:
        target = os.path.normpath(os.path.join(root, rel))
        if not target.startswith(root.rstrip(os.sep) + os.sep):
            raise InternalError(f"verify named a path outside the copy: {rel!r}")
        return target

    def _resync(self, folder_id: str) -> None:
        """Makes Syncthing notice local changes, then reverts them: a
        receive-only folder fetches again what it lacks."""
        self.st.scan(folder_id)
        self.st.revert(folder_id)

    def _try_scan(self, folder_id: str) -> None:
        try:
            self.st.scan(folder_id)
        except StateFSError:
            pass   # the watcher picks the report up later

    def _local_need(self, folder_id: str) -> int | None:
        """Bytes Syncthing still has to fetch for the folder (None: unknown,
        e.g. the folder is stopped because its directory is gone)."""
        try:
            return self.st.completion(folder_id).need_bytes
        except StateFSError:
            return None


# -- command line -------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="statefs-node",
        description="Keep a verified copy of a friend's StateFS outbox, received through Syncthing.")
    api = p.add_argument_group("Syncthing (give --api and --api-key, or --syncthing-home)")
    api.add_argument("--api", help="Syncthing's API URL, e.g. http://127.0.0.1:8384")
    api.add_argument("--api-key", help="Syncthing's API key (Settings > API Key)")
    api.add_argument("--syncthing-home", help="Syncthing's home directory (holding config.xml): "
                                              "read the API URL and key from it")
    p.add_argument("--owner", required=True, help="the owner's Syncthing device id")
    p.add_argument("--owner-address", help="where to reach the owner, e.g. tcp://host:22000 "
                                           "(default: discovery)")
    p.add_argument("--store", required=True, help="directory for the copies, node.json and the reports")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between rounds (default 60)")
    p.add_argument("--once", action="store_true", help="run one round, print its reports and exit")
    p.add_argument("--share-with", action="append", default=[], metavar="DEVICE_ID",
                   help="also share the copies with this device (a fresh machine restoring from here)")
    return p


def connect(args: argparse.Namespace) -> Syncthing:
    if args.syncthing_home:
        url, key = read_home(args.syncthing_home)
        return Syncthing(args.api or url, args.api_key or key)
    if not args.api or not args.api_key:
        raise UsageError("Syncthing's API is not given",
                         hint="give --api URL and --api-key KEY, or --syncthing-home DIR")
    return Syncthing(args.api, args.api_key)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.interval <= 0:
            raise UsageError("--interval must be positive", hint="e.g. --interval 60")
        node = Node(connect(args), args.owner, args.store, owner_address=args.owner_address,
                    share_with=tuple(args.share_with))
        ready = False
        while True:
            try:
                if not ready:
                    node.setup()
                    ready = True
                reports = node.round()
            except PeerUnavailable as exc:
                if args.once:
                    raise
                # Syncthing starting, restarting or briefly away (e.g. both
                # started at boot): try again next round.
                _complain(exc)
                reports = None
            if args.once:
                print(json.dumps(reports, indent=1))
                return 0
            if reports is not None:
                for r in reports:
                    print(f"statefs-node: {r['folder']}: head {r['head_counter']}, {r['present']}/"
                          f"{r['segments']} segments, {len(r['missing'])} missing, {len(r['damaged'])} "
                          f"damaged, {len(r['problems'])} problems", file=sys.stderr, flush=True)
            time.sleep(args.interval)
    except StateFSError as exc:
        _complain(exc)
        return int(exc.code)
    except KeyboardInterrupt:
        return 130


def _complain(exc: StateFSError) -> None:
    print(f"statefs-node: {exc.code.name}: {exc.message} ({exc.hint})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
