"""Peers through real Syncthing instances on loopback: an owner shares its
outbox with two nodes running statefs-node's logic, which verify, repair and
report back."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from statefsd.errors import Code, InvalidArgument
from statefsd.replica import format as rfmt
from statefsd.replica import peers
from statefsd.replica.node import Node
from tests.replica.conftest import image_state, served_state
from tests.replica.syncthing_fixtures import connect, free_ports, start_cluster, stop_cluster, tree, wait_for, wipe
from tests.replica.test_replica_format import KEYS, sealed_segment, write_copy
from tests.replica.test_replica_restore import CANARY, write_some

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    instances = start_cluster(str(tmp_path_factory.mktemp("syncthing")), ("owner", "node1", "node2"))
    try:
        connect(instances["owner"], instances["node1"])
        connect(instances["owner"], instances["node2"])
        yield instances
    finally:
        stop_cluster(instances)


class Replica:
    """The owner's side: an outbox in the replica format (sealed segments,
    heads signed by the owner's device key) shared with some peers, each
    running a node on its own store."""

    def __init__(self, cluster, tmp_path, nodes=("node1", "node2")):
        self.owner = cluster["owner"]
        self.st = self.owner.st
        # Every test has its own folder ids on the shared instances.
        self.replica_id = secrets.token_hex(8)
        self.folder_id = peers.outbox_folder_id(self.replica_id)
        self.state_dir = str(tmp_path / "replica")
        self.outbox = os.path.join(self.state_dir, "outbox")
        os.makedirs(self.outbox)
        self.device = SigningKey.generate()
        self.segments: dict[str, bytes] = {}
        self.counter = self.seq = 0
        self.nodes = {}
        for name in nodes:
            inst = cluster[name]
            peers.add_peer(self.st, inst.id, inst.address, self.outbox, self.replica_id, self.state_dir)
            node = Node(inst.st, self.owner.id, str(tmp_path / f"{name}-store"))
            node.setup()
            self.nodes[name] = node

    def push(self, n, *, retire=(), signer=None):
        """``n`` new sealed segments and a head listing every live one; the
        retired ones leave the head and then the outbox, as a push does."""
        for _ in range(n):
            self.segments[rfmt.segment_name(KEYS, self.seq)] = sealed_segment(self.seq, os.urandom(2000))
            self.seq += 1
        for name in retire:
            del self.segments[name]
        self.counter += 1
        write_copy(Path(self.outbox), signer or self.device, self.counter, self.segments, retired=retire)
        for name in retire:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.outbox, name))
        self.st.scan(self.folder_id)

    def copy_path(self, name):
        return os.path.join(self.nodes[name].store, self.folder_id)

    def accept(self, name):
        wait_for(lambda: self.folder_id in self.nodes[name].accept_offers() or
                 self.folder_id in self.nodes[name].copies(), 20, f"{name} to be offered the outbox")

    def synced(self, name, timeout=30):
        """Waits until the node's copy equals the outbox, byte for byte."""
        want = tree(self.outbox)
        wait_for(lambda: tree(self.copy_path(name)) == want, timeout, f"{name}'s copy to equal the outbox")

    def replicated(self, *names):
        """Each node accepts the outbox, receives all of it and verifies it."""
        for name in names or tuple(self.nodes):
            self.accept(name)
            self.synced(name)
            self.check(name)

    def check(self, name):
        # The node also takes offers other tests on the shared instances left behind.
        [report] = [r for r in self.nodes[name].round() if r["folder"] == self.folder_id]
        return report

    def status(self):
        return {p["device_id"]: p for p in peers.peer_status(self.st, self.outbox, self.replica_id, self.state_dir)}

    def owner_report(self, name):
        return self.owner_report_of(self.nodes[name].me)

    def owner_report_of(self, device_id):
        """The node's report as the owner received it."""
        return peers.read_report(self.state_dir, device_id)


def flip_a_bit(path):
    """Damage a file the way a failing disk does: same size, same mtime,
    so Syncthing's rescan does not notice."""
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_the_outbox_reaches_both_nodes_byte_identical_and_verified(cluster, tmp_path):
    rep = Replica(cluster, tmp_path)
    rep.push(6)
    for name in rep.nodes:
        rep.accept(name)
    for name in rep.nodes:
        rep.synced(name)
        report = rep.check(name)
        assert (report["head_counter"], report["present"], report["missing"], report["damaged"],
                report["problems"]) == (1, 6, [], [], [])
        assert report["pinned"] == bytes(rep.device.verify_key).hex()
    listed = {p["device_id"] for p in peers.list_peers(rep.st, rep.replica_id)}
    assert listed == {cluster["node1"].id, cluster["node2"].id}
    status = wait_for(lambda: (lambda s: s if all(p["ok"] for p in s.values()) else None)(rep.status()),
                      20, "both peers' reports at the owner")
    assert {p["head_counter"] for p in status.values()} == {1}


def test_a_node_killed_mid_transfer_resumes_and_completes(cluster, tmp_path):
    rep = Replica(cluster, tmp_path, nodes=("node1",))
    node = cluster["node1"]
    # Throttled so that the kill lands mid-transfer on any machine (rate
    # limits apply to loopback only with limitBandwidthInLan).
    node.st.patch_options(limitBandwidthInLan=True)
    node.st.patch_device(rep.owner.id, maxRecvKbps=256)
    rep.push(48)
    rep.accept("node1")
    seg_dir = os.path.join(rep.copy_path("node1"), "seg")

    def received():
        return len([n for n in os.listdir(seg_dir) if n.endswith(".sfs")]) if os.path.isdir(seg_dir) else 0
    wait_for(lambda: received() >= 4, 30, "the transfer to start")
    node.kill()
    got = received()
    node.start()
    node.st.patch_device(rep.owner.id, maxRecvKbps=0)
    node.st.patch_options(limitBandwidthInLan=False)
    assert 0 < got < 48, f"the kill must land mid-transfer ({got} of 48 received)"
    rep.synced("node1", timeout=60)
    report = rep.check("node1")
    assert (report["present"], report["missing"], report["damaged"]) == (48, [], [])


def test_a_segment_corrupted_on_one_node_is_reported_and_fetched_again(cluster, tmp_path):
    rep = Replica(cluster, tmp_path)
    rep.push(5)
    rep.replicated()
    victim = sorted(rep.segments)[2]
    flip_a_bit(os.path.join(rep.copy_path("node1"), victim))

    report = rep.check("node1")
    assert report["damaged"] == [victim] and "refetch-damaged" in report["actions"]
    wait_for(lambda: (rep.owner_report("node1") or {}).get("damaged") == [victim], 20, "the report at the owner")
    assert rep.status()[rep.nodes["node1"].me]["damaged"]
    rep.synced("node1")
    report = rep.check("node1")
    assert (report["present"], report["damaged"], report["actions"]) == (5, [], [])
    # The other node's copy was never touched.
    other = rep.check("node2")
    assert (other["present"], other["damaged"], other["actions"]) == (5, [], [])


def test_a_damaged_head_on_a_node_is_fetched_again(cluster, tmp_path):
    rep = Replica(cluster, tmp_path, nodes=("node2",))
    rep.push(2)
    rep.replicated("node2")
    head = rfmt.head_name(bytes(rep.device.verify_key), 1)
    flip_a_bit(os.path.join(rep.copy_path("node2"), head))
    report = rep.check("node2")
    assert head in report["damaged"] and report["problems"]
    rep.synced("node2")
    report = rep.check("node2")
    assert (report["head_counter"], report["damaged"], report["problems"]) == (1, [], [])


def test_a_node_whose_store_was_wiped_is_reseeded_and_reports_again(cluster, tmp_path):
    rep = Replica(cluster, tmp_path, nodes=("node2",))
    rep.push(5)
    rep.replicated("node2")
    node = rep.nodes["node2"]
    wipe(node.store)           # the copy, the report folder and node.json
    report = rep.check("node2")
    assert "reseed" in report["actions"]
    wait_for(lambda: "reseed" in (rep.owner_report("node2") or {}).get("actions", []), 20,
             "the owner to receive the report again")
    rep.synced("node2")
    report = rep.check("node2")
    assert (report["present"], report["missing"], report["problems"]) == (5, [], [])
    with open(os.path.join(node.store, "node.json")) as f:
        assert json.load(f)["pinned"] == {rep.folder_id: bytes(rep.device.verify_key).hex()}


def test_a_node_deletes_only_what_a_head_signed_by_the_owner_retires(cluster, tmp_path):
    rep = Replica(cluster, tmp_path, nodes=("node1",))
    rep.push(3)
    rep.replicated("node1")
    first = sorted(rep.segments)[0]
    kept = os.path.join(rep.copy_path("node1"), first)
    # The owner's outbox loses a segment no head retires: the peer keeps it
    # (its folder ignores deletes).
    os.remove(os.path.join(rep.outbox, first))
    rep.st.scan(rep.folder_id)
    time.sleep(1)
    assert rep.check("node1")["retired_applied"] == [] and os.path.exists(kept)
    # A head signed by a stranger that retires it: reported, nothing deleted.
    stranger = SigningKey.generate()
    write_copy(tmp_path / "forged", stranger, 2, {n: d for n, d in rep.segments.items() if n != first},
               retired=[first])
    head2 = rfmt.head_name(bytes(stranger.verify_key), 2)
    os.rename(tmp_path / "forged" / head2, os.path.join(rep.outbox, head2))
    rep.st.scan(rep.folder_id)
    wait_for(lambda: os.path.exists(os.path.join(rep.copy_path("node1"), head2)), 20, "the stranger's head")
    report = rep.check("node1")
    assert report["retired_applied"] == [] and os.path.exists(kept)
    assert any("not by the pinned key" in p for p in report["problems"]) and report["head_counter"] == 1
    os.remove(os.path.join(rep.outbox, head2))
    os.remove(os.path.join(rep.copy_path("node1"), head2))
    # The owner's own head retiring it: now the peer deletes it.
    rep.counter = 2
    rep.push(0, retire=[first])
    head3 = rfmt.head_name(bytes(rep.device.verify_key), 3)
    wait_for(lambda: os.path.exists(os.path.join(rep.copy_path("node1"), head3)), 20, "the owner's head 3")
    report = rep.check("node1")
    assert report["retired_applied"] == [first] and not os.path.exists(kept)
    assert (report["head_counter"], report["problems"]) == (3, [])


def test_peer_status_tells_behind_stale_and_ok_peers_apart(cluster, tmp_path):
    rep = Replica(cluster, tmp_path)
    n1, n2 = rep.nodes["node1"].me, rep.nodes["node2"].me
    rep.push(3)
    status = rep.status()
    # No node has accepted or reported yet: not ok, whatever Syncthing's
    # completion says.
    assert not status[n1]["ok"] and status[n1]["report"] is None and status[n1]["outbox_head"] == 1
    rep.replicated()
    wait_for(lambda: all(p["ok"] for p in rep.status().values()), 20, "both peers ok at head 1")
    # node2 goes away; a second head is pushed; node1 receives it but has
    # not verified it yet.
    rep.st.pause_device(n2)
    try:
        rep.push(2)
        rep.synced("node1")
        status = wait_for(lambda: (lambda s: s if s[n2]["behind"] and s[n1]["stale"] else None)(rep.status()),
                          20, "node2 behind and node1 stale")
        assert status[n2]["need_bytes"] > 0 and status[n2]["completion"] < 100
        assert not status[n2]["connected"] and status[n2]["last_seen"] is not None
        assert not status[n1]["behind"] and status[n1]["head_counter"] == 1 and status[n1]["outbox_head"] == 2
        rep.check("node1")
        wait_for(lambda: rep.status()[n1]["ok"], 20, "node1 ok at head 2")
        assert rep.status()[n1]["head_digest"] == rfmt.file_digest(
            read_head_body(rep.outbox, rep.device, 2)).hex()
    finally:
        rep.st.resume_device(n2)


def read_head_body(outbox, device, counter):
    from statefsd.replica.verify import read_heads
    return next(h.body for h in read_heads(Path(outbox), []) if h.counter == counter)


def node_argv(inst, rep, store, *extra):
    return [sys.executable, "-m", "statefsd.replica.node", "--syncthing-home", inst.home, "--owner", rep.owner.id,
            "--store", store, *extra]


NODE_ENV = dict(os.environ, PYTHONPATH=REPO)


def test_statefs_node_runs_one_round_as_a_program(cluster, tmp_path):
    rep = Replica(cluster, tmp_path, nodes=())
    node = cluster["node2"]
    peers.add_peer(rep.st, node.id, node.address, rep.outbox, rep.replica_id, rep.state_dir)
    rep.push(2)
    wait_for(lambda: rep.folder_id in node.st.pending_folders(), 20, "the offer")
    store = str(tmp_path / "store")

    def once():
        proc = subprocess.run(node_argv(node, rep, store, "--once"), capture_output=True, text=True, timeout=60,
                              cwd=REPO, env=NODE_ENV)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    once()
    want = tree(rep.outbox)
    wait_for(lambda: tree(os.path.join(store, rep.folder_id)) == want, 30, "the copy")
    [report] = once()
    assert (report["folder"], report["head_counter"], report["present"]) == (rep.folder_id, 1, 2)
    with open(os.path.join(store, "node.json")) as f:
        assert json.load(f)["pinned"] == {rep.folder_id: bytes(rep.device.verify_key).hex()}


def test_statefs_node_left_running_repairs_a_damaged_segment_by_itself(cluster, tmp_path):
    rep = Replica(cluster, tmp_path, nodes=())
    node = cluster["node1"]
    peers.add_peer(rep.st, node.id, node.address, rep.outbox, rep.replica_id, rep.state_dir)
    rep.push(3)
    store = str(tmp_path / "store")
    copy = os.path.join(store, rep.folder_id)
    with open(tmp_path / "node.log", "wb") as log:
        proc = subprocess.Popen(node_argv(node, rep, store, "--interval", "0.3"), stdout=log, stderr=log,
                                cwd=REPO, env=NODE_ENV)
    try:
        want = tree(rep.outbox)
        wait_for(lambda: tree(copy) == want, 30, "the copy")
        victim = sorted(rep.segments)[1]
        flip_a_bit(os.path.join(copy, victim))
        # Found (the damaged file is kept aside) and fetched again.
        wait_for(lambda: os.path.exists(os.path.join(store, "quarantine", rep.folder_id, victim)), 30,
                 "the node to find the damage")
        wait_for(lambda: tree(copy) == want, 30, "the node to fetch the segment again")
        wait_for(lambda: (lambda r: r and r["damaged"] == [] and r["present"] == 3)(
            rep.owner_report_of(node.id)), 30, "a whole copy reported to the owner")
    finally:
        proc.terminate()
        proc.wait(10)
    with open(tmp_path / "node.log") as f:
        assert "1 damaged" in f.read()


def test_statefs_node_without_a_reachable_api_exits_epeer_naming_the_next_step():
    base = [sys.executable, "-m", "statefsd.replica.node", "--owner", "X", "--store", "/tmp/x", "--once"]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=60, cwd=REPO, env=NODE_ENV)
    assert proc.returncode == Code.EUSAGE and "--syncthing-home" in proc.stderr
    [port] = free_ports(1)
    proc = subprocess.run(base + ["--api", f"http://127.0.0.1:{port}", "--api-key", "k"], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=NODE_ENV)
    assert proc.returncode == Code.EPEER and "start Syncthing" in proc.stderr


def test_a_removed_peer_no_longer_gets_the_outbox(cluster, tmp_path):
    other = Replica(cluster, tmp_path / "other", nodes=("node1",))
    rep = Replica(cluster, tmp_path / "this", nodes=("node1",))
    n1 = rep.nodes["node1"].me
    peers.remove_peer(rep.st, n1, rep.replica_id, rep.state_dir)
    assert peers.list_peers(rep.st, rep.replica_id) == []
    assert rep.st.folder(peers.report_folder_id(rep.replica_id, n1)) is None
    # The device stays: another replica's folders still share with it.
    assert rep.st.device(n1) is not None and peers.list_peers(other.st, other.replica_id) != []


def test_a_malformed_device_id_is_refused_before_anything_changes(cluster, tmp_path):
    owner = cluster["owner"]
    before = owner.st.config()
    with pytest.raises(InvalidArgument) as exc:
        peers.add_peer(owner.st, "ABCDEFG-HIJ", None, str(tmp_path), "0" * 16, str(tmp_path))
    assert "device id" in exc.value.message and owner.st.config() == before


def test_a_fresh_device_receives_the_copy_from_a_peer_that_shares_it(cluster, tmp_path):
    rep = Replica(cluster, tmp_path, nodes=("node1",))
    rep.push(4)
    rep.replicated("node1")
    peer, fresh = cluster["node1"], cluster["node2"]
    connect(peer, fresh)
    node = Node(peer.st, rep.owner.id, rep.nodes["node1"].store, share_with=(fresh.id,))
    node.setup()
    node.round()
    wait_for(lambda: peer.id in fresh.st.pending_folders().get(rep.folder_id, []), 20, "the peer's offer")
    # The fresh device takes it from the peer alone, not from the owner.
    restore = str(tmp_path / "restore")
    fresh.st.add_folder(rep.folder_id, restore, type="receiveonly", devices=[peer.id])
    want = tree(rep.outbox)
    wait_for(lambda: tree(restore) == want, 30, "the fresh device's copy")


def test_statefs_peer_add_push_status_and_restore_from_a_peer_end_to_end(cluster, replica_env, tmp_path):
    """The owner's commands with real statefsd and keystored: peers added,
    a push carried by Syncthing to two nodes, status seeing both copies,
    and a fresh device restoring from one peer's copy."""
    env, owner = replica_env, cluster["owner"]
    env.cli("replicate", "init", "--segment-size", "64K", "--syncthing-url", owner.st.url,
            "--syncthing-api-key", owner.st.api_key)
    with env.client() as c:
        write_some(c, 0, 60)
        c.put("big/value", os.urandom(200_000))
        want = served_state(c)
    for name in ("node1", "node2"):
        env.cli("peer", "add", cluster[name].id, cluster[name].address)
    pushed = env.cli("replicate", "push")
    assert pushed["engines"]["syncthing"] == "scanned"
    folder_id = peers.outbox_folder_id(json.loads((env.state / "replica.json").read_text())["replica_id"])
    copies = {}
    for name in ("node1", "node2"):
        node = Node(cluster[name].st, owner.id, str(tmp_path / f"{name}-store"))
        node.setup()
        wait_for(lambda: folder_id in node.accept_offers() or folder_id in node.copies(), 20, "the offer")
        copies[name] = os.path.join(node.store, folder_id)
        wanted = tree(str(env.outbox))
        wait_for(lambda: tree(copies[name]) == wanted, 30, f"{name}'s copy")
        [report] = node.round()
        assert (report["head_counter"], report["problems"], report["damaged"]) == (pushed["counter"], [], [])
    status = wait_for(lambda: (lambda s: s if s["copies_of_newest"] == 2 else None)(
        env.cli("replicate", "status")), 30, "both peers' reports in replicate status")
    assert all(p["ok"] for p in status["peers"]) and status["warnings"] == []
    for copy in copies.values():
        assert not any(CANARY in data for data in tree(copy).values())
    new_image = str(tmp_path / "new.img")
    env.cli("restore", "--from", copies["node2"], "--image", new_image,
            STATEFS_KEYSTORE_SOCKET=None, STATEFS_SOCKET=None)
    assert image_state(new_image) == want
