"""Workload (r): replication against the engines it drives, on the same
generated data (bench/vault_data.py), the same disk, all on loopback.

The tree is backed up into a vault on a fresh image (statefsd + keystored),
and the image's history is pushed into an outbox (sealed segments and
signed heads). Then, side by side with the same engine moving the plain
tree:

- remote: ``statefs replicate push`` to an SFTP remote (``rclone serve
  sftp`` with key authentication both ways) of a fresh outbox, and the
  upload alone of the outbox already written, against ``rclone copy`` of
  the plain tree with the same binary and settings;
- peer: Syncthing carrying the outbox (send-only, received by a
  statefs-node's logic on the peer) against a Syncthing folder holding the
  plain tree, each timed from the share (before the owner's scan hashes
  anything) until the peer holds every file;
- lag: one small commit pushed until the peer holds the new head, against
  one small file changed and scanned until the peer holds it (median of
  several runs);
- restore: ``statefs restore --from PEER_COPY`` with only the passphrase,
  and the restored image compared key by key (count and a digest over every
  key and value) with the source.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench import loopback, procs, vault_data
from bench.lab import Lab
from bench.params import Params
from bench.procs import REPO, ToolFailed, child_env, run_measured
from bench.vault import PASSPHRASE, _last_json, _version
from statefsd.client import Client

SEED = 1
MB = 1_000_000
PLAIN_FOLDER = "bench-plain"
POLL_S = 0.1


def missing() -> str | None:
    """Why the workload cannot run here, or None."""
    from statefsd.errors import StateFSError
    from statefsd.replica import rclone, syncthing

    if syncthing.binary() is None:
        return "syncthing is not installed (scripts/setup installs Debian's 'syncthing')"
    try:
        rclone.find_binary()
    except StateFSError as exc:
        return f"rclone is not installed ({exc.hint})"
    return None


def wait_until(condition, timeout: float, what: str):
    """Polls ``condition`` until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ToolFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_S)


def holds(root: str, wanted: dict[str, int]) -> bool:
    """Whether ``root`` holds every file of ``wanted`` (relative path ->
    size) at its size; an engine's temporary files do not count."""
    for rel, size in wanted.items():
        try:
            if os.path.getsize(os.path.join(root, rel)) != size:
                return False
        except OSError:
            return False
    return True


def received(st, folder_id: str, root: str, wanted: dict[str, int]) -> bool:
    """The peer's Syncthing says the folder is complete (100 %, nothing
    needed, a global state as large as what was sent) and its directory
    holds every file. The cheap API call runs first; the directory walk only
    once Syncthing thinks it is done."""
    try:
        c = st.completion(folder_id)
    except Exception:   # the folder is being (re)configured: ask again
        return False
    if c.completion < 100 or c.need_items or c.global_bytes < sum(wanted.values()):
        return False
    return holds(root, wanted)


def state_digest(items) -> dict:
    """Key count and a BLAKE2b over every (key, value) in key order."""
    h, n = hashlib.blake2b(digest_size=32), 0
    for key, value in items:
        k = key.encode()
        h.update(len(k).to_bytes(4, "big") + k + len(value).to_bytes(8, "big"))
        h.update(value)
        n += 1
    return {"keys": n, "blake2b": h.hexdigest()}


def served_items(socket: str, batch: int = 64):
    with Client(socket, timeout=600) as client:
        keys = sorted(client.list(""))
        for i in range(0, len(keys), batch):
            part = keys[i:i + batch]
            for key, got in zip(part, client.mget(part)):
                yield key, got[0]


def image_items(path: str):
    from statefsd.storage.blockdev import FileDevice
    from statefsd.storage.engine import Engine

    engine = Engine.mount(FileDevice(path, read_only=True), read_only=True)
    try:
        for key in sorted(engine.list("")):
            yield key, engine.get(key)
    finally:
        engine.close()


class Owner:
    """The device: an image served by statefsd (with keystored), its
    replica state dirs, and the statefs CLI run as timed processes."""

    def __init__(self, lab: Lab, data_bytes: int) -> None:
        self.lab = lab
        self.image = lab.path("replica-owner.img")
        self.image_bytes = ((2 * data_bytes + (128 << 20)) >> 20) << 20
        self.socket = lab.path("replica-owner.sock")
        self.keystore = ""
        self.daemon: procs.Process | None = None

    def start(self) -> None:
        procs.fresh_image(self.image, self.image_bytes)
        self.keystore = self.lab.keystore_socket()
        self.daemon = procs.statefsd(self.image, self.socket, keystore=self.keystore)

    def env(self, *, device: bool = True) -> dict:
        env = {k: v for k, v in child_env().items()
               if k not in ("STATEFS_SOCKET", "STATEFS_KEYSTORE_SOCKET", "STATEFS_REPLICA_DIR")}
        env["STATEFS_VAULT_PASSPHRASE"] = PASSPHRASE
        if device:
            env.update(STATEFS_SOCKET=self.socket, STATEFS_KEYSTORE_SOCKET=self.keystore)
        return env

    def cli(self, *args: str, device: bool = True) -> tuple[float, dict]:
        """One `statefs` process; its wall seconds and its JSON answer."""
        r = run_measured([sys.executable, "-m", "statefsd.cli", *args, "--json"], env=self.env(device=device),
                         cwd=REPO)
        return r["seconds"], _last_json(r["stdout"])

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


class Peers:
    """Two Syncthing instances on loopback (discovery, relays and NAT off),
    connected: the owner's and the peer's."""

    def __init__(self, lab: Lab) -> None:
        from statefsd.replica import syncthing

        self.syncthing = syncthing
        self.procs = []
        ports = loopback.free_ports(4)
        self.owner_proc, self.owner = syncthing.start_instance(lab.path("st-owner"), ports[0], ports[1], name="owner")
        self.procs.append(self.owner_proc)
        self.peer_proc, self.peer = syncthing.start_instance(lab.path("st-peer"), ports[2], ports[3], name="peer")
        self.procs.append(self.peer_proc)
        self.owner_address, self.peer_address = f"tcp://127.0.0.1:{ports[1]}", f"tcp://127.0.0.1:{ports[3]}"
        self.owner_id, self.peer_id = self.owner.device_id(), self.peer.device_id()
        self.owner.add_device(self.peer_id, self.peer_address, name="peer")
        self.peer.add_device(self.owner_id, self.owner_address, name="owner")

    def stop(self) -> None:
        for proc in self.procs:
            self.syncthing.stop_instance(proc)
        self.procs = []


def replica(lab: Lab, p: Params, progress) -> dict:
    reason = missing()
    if reason:
        return {"skipped": reason}
    from statefsd.replica import config as rconfig
    from statefsd.replica import remotes
    from statefsd.replica.node import Node
    from statefsd.replica.rclone import Rclone, local_files
    from statefsd.replica.verify import verify_copy

    data = lab.path("replica-data")
    progress(f"replica: generating {p.replica_bytes / (1 << 20):,.0f} MiB (seed {SEED})")
    v1 = vault_data.make_v1(data, p.replica_bytes, SEED)
    src_bytes = v1["bytes"]
    out: dict = {"data": {"bytes": src_bytes, "files": v1["files"], "seed": SEED},
                 "segment_size": p.replica_segment}
    owner, peers_, sftp = Owner(lab, src_bytes), None, None
    state_a, state_b = lab.path("replica-state"), lab.path("replica-state-remote")
    outbox = str(rconfig.outbox(Path(state_a)))

    def rate(seconds: float) -> float:
        return round(src_bytes / seconds / MB, 2)

    try:
        peers_ = Peers(lab)
        rclone = Rclone.for_state(state_b)
        out["versions"] = {"syncthing": peers_.owner.version(), "rclone": _version([rclone.binary, "version"]),
                           "statefs": _version([sys.executable, "-c", "import importlib.metadata as m; "
                                                                      "print(m.version('statefs'))"])}
        # 1. the vault backup (the data every copy below carries)
        owner.start()
        progress("replica: replicate init, vault backup")
        owner.cli("replicate", "init", "--state", state_a, "--segment-size", p.replica_segment,
                  "--syncthing-url", peers_.owner.url,
                  "--syncthing-api-key", peers_.owner.api_key)
        vault_data.warm(data)
        s, backup = owner.cli("vault", "backup", data)
        out["backup"] = {"seconds": round(s, 3), "mb_per_s": rate(s), "reported": backup}

        # 2. the push into the outbox, no engine configured yet
        progress("replica: push into the outbox")
        s, pushed = owner.cli("replicate", "push", "--state", state_a)
        files = remotes.replica_files(local_files(outbox))
        out["push"] = {"seconds": round(s, 3), "mb_per_s": rate(s), "outbox_bytes": sum(files.values()),
                       "outbox_files": len(files), "segments_written": pushed.get("segments_written"),
                       "head_counter": pushed.get("counter"), "txns": pushed.get("txns")}

        # 3. an SFTP remote: StateFS's push + upload, its upload alone, plain rclone copy
        progress("replica: remote (rclone serve sftp)")
        sftp = loopback.start_sftp(rclone.binary, lab.path("sftp"), lab.path("sftp-root"))
        owner.cli("replicate", "init", "--state", state_b, "--segment-size", p.replica_segment)
        owner.cli("remote", "add", "bench", sftp.spec("statefs"), "--state", state_b)
        s_whole, whole = owner.cli("replicate", "push", "--state", state_b)
        sent = (whole.get("engines") or {}).get("bench") or {}
        if not isinstance(sent, dict) or "error" in sent or not sent.get("files"):
            raise ToolFailed(f"push to the remote did not upload: {sent}")
        began = time.monotonic()
        upload = remotes.push(rclone, outbox, sftp.spec("upload"), state_dir=lab.path("sftp"))
        s_upload = time.monotonic() - began
        vault_data.warm(data)
        began = time.monotonic()
        rclone.run(["copy", data, sftp.spec("plain")], remote=sftp.spec("plain"), doing="uploading to")
        s_plain = time.monotonic() - began
        for name in ("statefs", "upload"):
            report = verify_copy(os.path.join(sftp.root, name))
            if not report.ok():
                raise ToolFailed(f"the remote's copy {name} does not verify: {report.as_dict()}")
        problems = vault_data.differences(data, os.path.join(sftp.root, "plain"))
        if problems:
            raise ToolFailed("rclone copy's tree differs from the source: " + "; ".join(problems))
        out["remote"] = {
            "statefs_push_upload_s": round(s_whole, 3), "statefs_push_upload_mb_per_s": rate(s_whole),
            "statefs_upload_s": round(s_upload, 3), "statefs_upload_mb_per_s": rate(s_upload),
            "statefs_uploaded_bytes": upload["bytes"], "statefs_uploaded_files": upload["files"],
            "rclone_copy_s": round(s_plain, 3), "rclone_copy_mb_per_s": rate(s_plain),
            "rclone_copy_files": v1["files"],
            "settings": "rclone serve sftp on 127.0.0.1, Ed25519 keys both ways; the product's rclone settings "
                        "(retries 2, low-level retries 3) for all three; default --transfers 4",
        }
        sftp.stop()
        shutil.rmtree(sftp.root, ignore_errors=True)
        shutil.rmtree(state_b, ignore_errors=True)

        # 4. a peer: the outbox and the plain tree, each shared and received whole
        progress("replica: peer (Syncthing), the outbox")
        rid = rconfig.load(Path(state_a)).replica_id
        folder_id = f"statefs-{rid}"
        node = Node(peers_.peer, peers_.owner_id, lab.path("peer-store"))
        node.setup()
        copy = os.path.join(node.store, folder_id)
        began = time.monotonic()
        s_add, _ = owner.cli("peer", "add", peers_.peer_id, peers_.peer_address, "--state", state_a)
        wait_until(lambda: folder_id in node.accept_offers() or folder_id in node.copies(), 120, "the outbox offer")
        wait_until(lambda: received(peers_.peer, folder_id, copy, files), 3600, "the peer's copy of the outbox")
        s_statefs = time.monotonic() - began
        report = verify_copy(copy)
        if not report.ok() or report.head_counter != pushed.get("counter"):
            raise ToolFailed(f"the peer's copy does not verify: {report.as_dict()}")

        progress("replica: peer (Syncthing), the plain tree")
        plain_copy = lab.path("peer-plain")
        plain_files = local_files(data)
        vault_data.warm(data)
        began = time.monotonic()
        peers_.owner.add_folder(PLAIN_FOLDER, data, type="sendonly", devices=[peers_.peer_id])

        def accept_plain() -> bool:
            if peers_.peer.folder(PLAIN_FOLDER) is not None:
                return True
            if PLAIN_FOLDER in peers_.peer.pending_folders(peers_.owner_id):
                peers_.peer.add_folder(PLAIN_FOLDER, plain_copy, type="receiveonly", devices=[peers_.owner_id])
            return False

        wait_until(accept_plain, 120, "the plain folder offer")
        wait_until(lambda: received(peers_.peer, PLAIN_FOLDER, plain_copy, plain_files), 3600,
                   "the peer's copy of the plain tree")
        s_plain = time.monotonic() - began
        problems = vault_data.differences(data, plain_copy)
        if problems:
            raise ToolFailed("Syncthing's copy of the plain tree differs: " + "; ".join(problems))
        out["peer"] = {"statefs_sync_s": round(s_statefs, 3), "statefs_sync_mb_per_s": rate(s_statefs),
                       "syncthing_plain_s": round(s_plain, 3), "syncthing_plain_mb_per_s": rate(s_plain),
                       "statefs_peer_add_process_s": round(s_add, 3), "copy_head_counter": report.head_counter,
                       "copy_segments": report.segments,
                       "settings": "two Syncthing instances on 127.0.0.1, discovery, relays and NAT off; "
                                   "send-only on the owner, receive-only on the peer"}

        # 5. lag: one small change until the peer holds it
        lags, plain_lags, push_s, growth = [], [], [], []
        before = files
        small = sorted(rel for rel in plain_files if rel.endswith(".txt"))[0]
        for i in range(p.replica_lag_runs):
            progress(f"replica: lag {i + 1}/{p.replica_lag_runs}")
            began = time.monotonic()
            with Client(owner.socket) as client:
                client.put(f"bench/lag/{i}", os.urandom(100))
            s, pushed = owner.cli("replicate", "push", "--state", state_a)
            push_s.append(round(s, 3))
            now = remotes.replica_files(local_files(outbox))
            # What one small commit costs the outbox (and every copy): new segments and a head.
            growth.append(sum(now.values()) - sum(before.values()))
            before = now
            wait_until(lambda: holds(copy, now), 600, "the peer's copy of the new head")
            lags.append(time.monotonic() - began)
            report = verify_copy(copy)
            if not report.ok() or report.head_counter != pushed.get("counter"):
                raise ToolFailed(f"the peer's copy after a change does not verify: {report.as_dict()}")

            content = f"lag {i} {os.urandom(8).hex()}\n".encode()
            began = time.monotonic()
            with open(os.path.join(data, small), "wb") as f:
                f.write(content)
            peers_.owner.scan(PLAIN_FOLDER)

            def has_change() -> bool:
                try:
                    with open(os.path.join(plain_copy, small), "rb") as f:
                        return f.read() == content
                except OSError:
                    return False

            wait_until(has_change, 600, "the peer's copy of the changed file")
            plain_lags.append(time.monotonic() - began)
        out["lag"] = {"statefs_s": [round(x, 3) for x in lags], "statefs_push_process_s": push_s,
                      "statefs_outbox_growth_bytes": growth,
                      "syncthing_s": [round(x, 3) for x in plain_lags],
                      "statefs_median_s": round(statistics.median(lags), 3),
                      "syncthing_median_s": round(statistics.median(plain_lags), 3),
                      "what": "StateFS: a 100-byte put, `statefs replicate push` (a process: start-up, "
                              "passphrase, push, Syncthing rescan), until the peer holds every outbox file; "
                              "plain: one small file rewritten, a rescan, until the peer holds its new bytes"}

        # 6. restore from the peer's copy with only the passphrase
        progress("replica: restore from the peer's copy")
        restored = lab.path("replica-restored.img")
        s, result = owner.cli("restore", "--from", copy, "--image", restored, device=False)
        source = state_digest(served_items(owner.socket))
        target = state_digest(image_items(restored))
        out["restore"] = {"seconds": round(s, 3), "mb_per_s": rate(s), "keys": result.get("keys"),
                          "txn": result.get("txn"), "image_bytes": os.path.getsize(restored),
                          "source": source, "restored": target, "equal": source == target}
        if source != target:
            raise ToolFailed(f"the restored image differs from the source: {source} != {target}")
        os.unlink(restored)
    finally:
        if sftp is not None:
            sftp.stop()
        if peers_ is not None:
            peers_.stop()
        owner.stop()
        shutil.rmtree(data, ignore_errors=True)
        # The copies are as large as the data: the other workloads need the disk.
        for name in ("sftp-root", "peer-store", "peer-plain"):
            shutil.rmtree(lab.path(name), ignore_errors=True)
        for name in ("replica-restored.img", "replica-owner.img"):
            if os.path.exists(lab.path(name)):
                os.unlink(lab.path(name))
    r, peer, lag = out["remote"], out["peer"], out["lag"]
    out.update({
        "replica_push_mb_per_s": out["push"]["mb_per_s"],
        "replica_remote_mb_per_s": r["statefs_push_upload_mb_per_s"],
        "rclone_copy_mb_per_s": r["rclone_copy_mb_per_s"],
        "replica_vs_rclone_copy": round(r["statefs_push_upload_mb_per_s"] / r["rclone_copy_mb_per_s"], 4),
        "replica_upload_vs_rclone_copy": round(r["statefs_upload_mb_per_s"] / r["rclone_copy_mb_per_s"], 4),
        "replica_peer_mb_per_s": peer["statefs_sync_mb_per_s"],
        "syncthing_mb_per_s": peer["syncthing_plain_mb_per_s"],
        "replica_vs_syncthing": round(peer["statefs_sync_mb_per_s"] / peer["syncthing_plain_mb_per_s"], 4),
        "replica_lag_s": lag["statefs_median_s"], "syncthing_lag_s": lag["syncthing_median_s"],
        "replica_lag_vs_syncthing": round(lag["statefs_median_s"] / lag["syncthing_median_s"], 4),
        "restore_1gib_from_peer_s": out["restore"]["seconds"],
        "restore_equal": out["restore"]["equal"],
        "notes": ["MB/s are source-tree bytes (the plain data) per wall second, for every row",
                  "each `statefs` step is one process's wall time: start-up and the passphrase's Argon2id "
                  "included (the peer's share includes the `statefs peer add` process: "
                  "peer.statefs_peer_add_process_s; each lag its `statefs replicate push`: "
                  "lag.statefs_push_process_s)",
                  "restore_1gib_from_peer_s is the restore of this run's data size (data.bytes)"],
    })
    return out
