"""Vault workloads and the vault's own invariants (13)-(17) after every cut.

The vault (statefsd.vault) runs on the session's engine through
``vaultkv.EngineKV``, every commit recorded by the session, so the engine's
invariants (1)-(3) hold for it as for any workload. After each first cut the
runner hands the recovered image to :meth:`VaultPlan.check`:

(13) every snapshot whose commit was acknowledged before the cut is listed
     (unless a forget of it is part of the recovered state), and every
     snapshot record is one a backup submitted before the cut;
(14) every listed snapshot verifies (``vault check --read-data``: signature,
     every node and chunk unsealed and its ID recomputed, every object
     counted) and restores to exactly the tree it was taken from;
(15) reference counts: every object record has its data and every data its
     record, a zero marker exists exactly when the count is zero, and the
     count equals the distinct stored nodes listing the object plus the
     snapshots whose root it is (every node walked: the trees are tiny);
(16) the interrupted operation (init, backup, forget or prune), run again on
     the recovered image, succeeds, and (14) and (15) hold afterwards, with
     the new snapshot restoring to its tree, a forgotten one gone, and after
     a prune no zero-count object left (the crashed sessions are stale by then);
(17) a re-run backup stores fewer new bytes than its first attempt whenever
     objects of the first attempt were durable at the cut.

(13) is checked from the recovered state of every crash state. (14)-(17) depend
only on the vault's keys and the operation interrupted, so each distinct
(vault keys, operation) pair is checked once, on a copy of the first recovered
image that holds it; every later crash state with the same pair shares the
verdict (invariants (1)-(3) compared that state whole).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from statefsd.errors import NoSpace
from statefsd.testing.simdev import Outcome
from statefsd.testing.vaultkv import (
    EPOCH_NS, VIRTUAL_ROOT, EngineKV, Manifest, VaultSigner, World, materialize, snapshot_of,
)
from statefsd.vault import kv as kvmod
from statefsd.vault import records as rec
from statefsd.vault import vault as vaultmod
from statefsd.vault.backup import Backup
from statefsd.vault.check import Checker
from statefsd.vault.forget import forget, prune
from statefsd.vault.progress import Progress
from statefsd.vault.restore import Restore

from statefsd.testing.campaign.session import Session
from statefsd.testing.campaign.timeline import State, Violation
from statefsd.testing.campaign.workloads import workload

CHUNKER = {"min": 4 << 10, "avg": 16 << 10, "max": 64 << 10}
PASSPHRASE = "campaign passphrase"
TREE = VIRTUAL_ROOT + "/tree"
DIRS = ("docs", "docs/deep", "src")
BASE_MTIME = 1_650_000_000 * 10**9
DAY_NS = 86_400 * 10**9
VAULT_BYTES = 4 << 20           # both log regions hold two versions of the tree with room to spare
# The chain is the engine's to prove (replay findings, invariant 5); vault check reports it verified.
LOG_CHECKED_BY_CAMPAIGN = {"findings": [], "chain_head_matches": True, "checkpoints": 0, "verified_checkpoints": 0}


class Quiet(Progress):
    """The vault's warnings kept, not printed: the checks turn them into violations."""

    def warn(self, message: str) -> None:
        self.warnings.append(message)


# -- source trees ---------------------------------------------------------------------------------


def first_tree(rng) -> Manifest:
    """Two dozen files (three of them cut into several chunks), a symlink, an empty file."""
    tree: Manifest = {d: ("d", 0o755, BASE_MTIME) for d in DIRS}
    for i in range(24):
        size = rng.randrange(24 << 10, 72 << 10) if i % 8 == 3 else rng.randrange(40, 6000)
        tree[f"{['', 'docs/', 'docs/deep/', 'src/'][i % 4]}file-{i:02}"] = (
            "f", 0o644, BASE_MTIME + i, rng.randbytes(size))
    tree["empty"] = ("f", 0o600, BASE_MTIME, b"")
    tree["link"] = ("l", "docs/file-01", BASE_MTIME)
    return tree


def next_tree(tree: Manifest, rng, version: int) -> Manifest:
    """Three small files rewritten, bytes inserted inside a large one, two files deleted,
    two added; the directories that changed get a new mtime."""
    out = dict(tree)
    now = BASE_MTIME + version * 10**12
    files = sorted(p for p, item in tree.items() if item[0] == "f" and item[3])
    small = [p for p in files if len(tree[p][3]) < 8000]
    large = [p for p in files if len(tree[p][3]) >= 8000]
    touched = set()
    for path in rng.sample(small, 3):
        out[path] = ("f", 0o644, now, rng.randbytes(rng.randrange(40, 6000)))
    big = rng.choice(large)
    data = tree[big][3]
    cut = rng.randrange(len(data))
    out[big] = ("f", 0o644, now, data[:cut] + rng.randbytes(300) + data[cut:])
    for path in rng.sample([p for p in small if out[p] == tree[p]], 2):
        del out[path]
        touched.add(os.path.dirname(path))
    for i in range(2):
        path = f"{rng.choice(['', 'docs/', 'src/'])}new-{version}-{i}"
        out[path] = ("f", 0o644, now, rng.randbytes(rng.randrange(40, 9000)))
        touched.add(os.path.dirname(path))
    for d in touched - {""}:
        out[d] = ("d", 0o755, now)
    return out


def lay_out(tree: Manifest, real_root: str) -> None:
    """``tree`` at ``real_root``/tree, which the vault sees as TREE; every mtime fixed."""
    path = os.path.join(real_root, "tree")
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path)
    materialize(tree, path)
    for p in (path, real_root):
        os.chmod(p, 0o755)
        os.utime(p, ns=(BASE_MTIME, BASE_MTIME))


# -- the plan: what the workload did, for the checks ---------------------------------------------


@dataclass
class Snap:
    key: str
    version: int
    record: bytes               # the snapshot record its backup committed
    submit: int
    ack: int
    tombstone: bytes | None = None
    forget_submit: int | None = None


@dataclass
class Phase:
    kind: str                   # init, backup, forget, prune
    ops: tuple[int, int]        # trace positions when it began and when it returned
    objects_before: frozenset[str]   # object keys stored when it began
    version: int | None = None  # backup: the tree it backed up
    new_bytes: int = 0          # backup: what its first attempt stored
    target: bytes | None = None  # forget: the snapshot ID


@dataclass
class VaultPlan:
    seed: int
    trees: list[Manifest] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    snaps: dict[str, Snap] = field(default_factory=dict)
    tally: dict[str, int] = field(default_factory=dict)
    _verdicts: dict[tuple, list[Violation]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return dict(self.tally)

    def count(self, name: str, n: int = 1) -> None:
        self.tally[name] = self.tally.get(name, 0) + n

    def phase_at(self, cut: int) -> int | None:
        """The operation a cut interrupted (a cut before the first one counts as in it), or None."""
        for i, phase in enumerate(self.phases):
            if cut < phase.ops[1]:
                return i
        return None

    # -- the check of one crash state

    def check(self, system, device, state: State, cut: int) -> list[Violation]:
        out = self._listed(state, cut)
        phase = self.phase_at(cut)
        digest = hashlib.blake2b(digest_size=16)
        for key in sorted(k for k in state if k.startswith(rec.PREFIX)):
            digest.update(key.encode() + b"\0" + state[key] + b"\0")
        key = (digest.digest(), phase)
        if key not in self._verdicts:
            self.count("distinct vault states checked")
            point = device.crash_point()
            copy = point.device(Outcome.keep_all(len(point.pending)), record=False)
            self._verdicts[key] = Deep(self, system, copy, state, phase).run()
        return out + self._verdicts[key]

    def _listed(self, state: State, cut: int) -> list[Violation]:
        """(13), from the recovered state alone."""
        out = []
        for snap in self.snaps.values():
            value = state.get(snap.key)
            forgotten = snap.tombstone is not None and value == snap.tombstone
            if snap.ack <= cut and not forgotten and value != snap.record:
                out.append(Violation(13, f"snapshot {snap.key} was acknowledged (op #{snap.ack}, cut after "
                                         f"#{cut}) but is {'gone' if value is None else 'another record'}"))
        for key, value in state.items():
            if not key.startswith(rec.SNAPSHOT_PREFIX):
                continue
            snap = self.snaps.get(key)
            submitted = snap is not None and (
                (value == snap.record and snap.submit < cut)
                or (value == snap.tombstone and snap.forget_submit is not None and snap.forget_submit < cut))
            if not submitted:
                out.append(Violation(13, f"{key} holds a snapshot record no operation submitted before the cut"))
        return out


class Deep:
    """(14)-(17) on a private copy of one recovered image."""

    def __init__(self, plan: VaultPlan, system, device, state: State, phase: int | None) -> None:
        self.plan, self.system, self.device, self.state = plan, system, device, state
        self.phase = plan.phases[phase] if phase is not None else None
        self.out: list[Violation] = []
        self.stage = 14             # what an exception violates: (14) until the re-run starts, then (16)

    def run(self) -> list[Violation]:
        tmp = tempfile.mkdtemp(prefix="statefs-vault-check-")
        seed = int.from_bytes(hashlib.blake2b(repr(sorted(self.state)).encode(), digest_size=8).digest(), "little")
        engine = None
        try:
            engine = self.system.mount(self.device)
            kv = (self.system.vault_kv or EngineKV)(lambda: engine)
            # The check runs a day after the cut: the crashed operation's session is stale.
            with World(seed, tmp, EPOCH_NS + DAY_NS):
                self._run(kv, tmp)
        except Exception as exc:  # a vault failure is a finding, not a campaign crash
            when = "re-running the interrupted operation" if self.stage == 16 else "reading the recovered vault"
            self.out.append(Violation(self.stage, f"{when} failed: {type(exc).__name__}: {exc}"))
        finally:
            if engine is not None:
                engine.close()
            shutil.rmtree(tmp, ignore_errors=True)
        return self.out

    def _run(self, kv, tmp: str) -> None:
        device = vaultmod.Device(VaultSigner())
        if kvmod.get(kv, rec.CONFIG_KEY) is None:
            if self.phase is None or self.phase.kind != "init":
                self.out.append(Violation(13, "the vault's config is gone after its init was acknowledged"))
                return
            self.stage = 16
            vaultmod.init(kv, vaultmod.Secret(passphrase=PASSPHRASE), device, chunker=CHUNKER)
            self.plan.count("re-runs of init")
            self._verify(vaultmod.open_vault(kv, vaultmod.Secret(), device), tmp, after="after re-running init")
            return
        vault = vaultmod.open_vault(kv, vaultmod.Secret(), device)
        before = self._verify(vault, tmp, after="")
        if self.phase is None or self.phase.kind == "init":
            return
        kind = self.phase.kind
        self.stage = 16
        self.plan.count(f"re-runs of {kind}")
        label = f"after re-running the interrupted {kind}"
        if kind == "backup":
            lay_out(self.plan.trees[self.phase.version], tmp)
            result = Backup(vault, [TREE], progress=Quiet(None)).run()
            after = self._verify(vault, tmp, after=label, new={result["snapshot"]: self.phase.version})
            if set(after) != set(before) | {result["snapshot"]}:
                self.out.append(Violation(16, f"{label}: snapshots {sorted(after)}, expected "
                                              f"{sorted(before)} and {result['snapshot']}"))
            self._reuse(result["new_bytes"])
        elif kind == "forget":
            target = self.phase.target.hex()
            if target in before:
                forget(vault, next(s for s in vault.snapshots() if s["id"].hex() == target))
            after = self._verify(vault, tmp, after=label)
            if set(after) != set(before) - {target}:
                self.out.append(Violation(16, f"{label}: snapshots {sorted(after)}, expected {sorted(before)} "
                                              f"without {target}"))
        elif kind == "prune":
            prune(vault, Quiet(None))
            after = self._verify(vault, tmp, after=label)
            left = list(kvmod.iter_keys(kv, rec.ZERO_PREFIX))
            if left:
                self.out.append(Violation(16, f"{label}: {len(left)} zero-count objects left (first {left[0]})"))
            if set(after) != set(before):
                self.out.append(Violation(16, f"{label}: snapshots {sorted(after)}, expected {sorted(before)}"))

    def _reuse(self, new_bytes: int) -> None:
        """(17)"""
        durable = [k for k in self.state if k.startswith(rec.OBJECT_PREFIX) and k not in self.phase.objects_before]
        if not durable:
            return
        self.plan.count("backup re-runs with objects of the first attempt durable")
        if new_bytes < self.phase.new_bytes:
            self.plan.count("backup re-runs that stored fewer new bytes")
        else:
            self.out.append(Violation(17, f"{len(durable)} objects of the interrupted backup were durable, yet its "
                                          f"re-run stored {new_bytes} new bytes, its first attempt {self.phase.new_bytes}"))

    # -- (14) and (15)

    def _verify(self, vault, tmp: str, *, after: str, new: dict[str, int] | None = None) -> dict[str, int]:
        """Check every listed snapshot and every count; returns {snapshot id: tree version}."""
        inv, where = (16, f"{after}: ") if after else (14, "")
        versions = {}
        for snap in vault.snapshots():
            sid = snap["id"].hex()
            known = self.plan.snaps.get(rec.snapshot_key(snap["id"]))
            version = known.version if known else (new or {}).get(sid)
            if version is None:
                self.out.append(Violation(13, f"{where}snapshot {sid} was made by no backup of this run"))
                continue
            versions[sid] = version
        report = Checker(vault, read_data=True, progress=Quiet(None)).run(LOG_CHECKED_BY_CAMPAIGN)
        for problem in report["problems"][:3]:
            self.out.append(Violation(inv, f"{where}vault check: {problem['where']}: {problem['problem']}"))
        for snap in vault.snapshots():
            sid = snap["id"].hex()
            if sid in versions and (not after or sid in (new or {})):
                self._restore(vault, snap, versions[sid], tmp, inv, where)
        for problem in count_problems(vault)[:3]:
            self.out.append(Violation(15 if not after else 16, f"{where}{problem}"))
        return versions

    def _restore(self, vault, snap: dict, version: int, tmp: str, inv: int, where: str) -> None:
        target = os.path.join(tmp, "restore-" + snap["id"].hex())
        result = Restore(vault, snap, target, progress=Quiet(None)).run()
        got = snapshot_of(os.path.join(target, VIRTUAL_ROOT.strip("/"), "tree"))
        sid = snap["id"].hex()
        if result["damaged"] or result["failed"]:
            self.out.append(Violation(inv, f"{where}restore of {sid}: damaged {result['damaged'][:2]}, "
                                           f"failed {result['failed'][:2]}"))
        elif got != self.plan.trees[version]:
            want = self.plan.trees[version]
            differ = sorted(p for p in set(got) | set(want) if got.get(p) != want.get(p))
            self.out.append(Violation(inv, f"{where}snapshot {sid} restores to another tree than version "
                                           f"{version}: {len(differ)} paths differ ({', '.join(differ[:4])})"))
        shutil.rmtree(target, ignore_errors=True)


def count_problems(vault) -> list[str]:
    """(15): every object's record, data, zero marker and count against a walk of every node."""
    kv, store = vault.kv, vault.objects()
    objects = {rec.id_from_key(k, rec.OBJECT_PREFIX) for k in kvmod.iter_keys(kv, rec.OBJECT_PREFIX)}
    data = {rec.id_from_key(k, rec.DATA_PREFIX) for k in kvmod.iter_keys(kv, rec.DATA_PREFIX)}
    zero = {rec.id_from_key(k, rec.ZERO_PREFIX) for k in kvmod.iter_keys(kv, rec.ZERO_PREFIX)}
    problems = [f"object {o.hex()[:16]} has a record but no data" for o in sorted(objects - data)]
    problems += [f"object {o.hex()[:16]} has data but no record" for o in sorted(data - objects)]
    problems += [f"zero marker {o.hex()[:16]} names no object" for o in sorted(zero - objects)]
    expected = dict.fromkeys(objects, 0)
    for snap in vault.snapshots():
        expected[snap["root"]] = expected.get(snap["root"], 0) + 1
    found = store.lookup(sorted(objects))
    for oid in sorted(objects):
        if found[oid][0].kind == rec.KIND_NODE and oid in data:
            for child in rec.node_children(*store.read_node(oid)):
                expected[child] = expected.get(child, 0) + 1
    for oid, want in sorted(expected.items()):
        if oid not in objects:
            problems.append(f"object {oid.hex()[:16]} is referenced {want} times but not stored")
            continue
        refs = found[oid][0].refs
        if refs != want:
            problems.append(f"object {oid.hex()[:16]} counts {refs} references, {want} exist")
        if (refs == 0) != (oid in zero):
            problems.append(f"object {oid.hex()[:16]} counts {refs} references and "
                            f"{'has' if oid in zero else 'lacks'} a zero marker")
    return problems


# -- the workload driver -------------------------------------------------------------------------


class VaultRun:
    """A vault on the session's engine: phases recorded for the checks."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.plan = VaultPlan(seed=s.rng.getrandbits(64))
        self.tmp = tempfile.mkdtemp(prefix="statefs-vault-campaign-")
        self.world = World(self.plan.seed, self.tmp)
        self.kv = (s.system.vault_kv or EngineKV)(lambda: s.engine, commit=self._commit, maintain=s.maintain)
        self.device = vaultmod.Device(VaultSigner())
        self.vault = None
        s.extra_check = self.plan

    def _commit(self, mutations, expect) -> int:
        txn_id = self.s.commit(mutations, expect)
        if txn_id is None:
            raise NoSpace("the vault workload's image is too small (a sizing bug of the campaign)")
        return txn_id

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "VaultRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def phase(self, kind: str, **info):
        objects = frozenset(k for k in self.s.engine.list(rec.OBJECT_PREFIX))
        start, txns = self.s.ops(), len(self.s.txns)
        phase = Phase(kind, (start, start), objects, **info)
        with self.world:
            yield phase
        phase.ops = (start, self.s.ops())
        self.plan.phases.append(phase)
        self.new_txns = self.s.txns[txns:]

    def cut_from_here(self) -> None:
        """Crash points start here: what came before is setup, cut in another workload."""
        self.s.start = self.s.ops()

    def init(self) -> None:
        with self.phase("init"):
            self.vault = vaultmod.init(self.kv, vaultmod.Secret(passphrase=PASSPHRASE), self.device, chunker=CHUNKER)

    def backup(self, tree: Manifest) -> None:
        self.plan.trees.append(tree)
        version = len(self.plan.trees) - 1
        lay_out(tree, self.tmp)
        with self.phase("backup", version=version) as phase:
            result = Backup(self.vault, [TREE], progress=Quiet(None)).run()
            phase.new_bytes = result["new_bytes"]
        key = rec.snapshot_key(bytes.fromhex(result["snapshot"]))
        txn = next(t for t in self.new_txns if key in t.paths)
        self.plan.snaps[key] = Snap(key, version, dict(txn.writes)[key], txn.submit, txn.ack)

    def forget_oldest(self) -> None:
        with self.world:
            snap = self.vault.snapshots()[0]
        with self.phase("forget", target=snap["id"]):
            forget(self.vault, snap)
        key = rec.snapshot_key(snap["id"])
        txn = next(t for t in self.new_txns if key in t.paths)
        self.plan.snaps[key].tombstone = dict(txn.writes)[key]
        self.plan.snaps[key].forget_submit = txn.submit

    def prune(self) -> None:
        with self.phase("prune"):
            prune(self.vault, Quiet(None))


@workload("vault-backup", device_bytes=VAULT_BYTES, seeds=3, outcomes=6)
def vault_backup(s: Session) -> None:
    """The vault (statefsd.vault, chunks of 4 to 64 KiB): init, a backup of a generated tree of
    two dozen files (about 200 KiB), the tree changed, a second backup; vault invariants
    (13)-(17) after every cut."""
    with VaultRun(s) as v:
        tree = first_tree(s.rng)
        v.init()
        v.backup(tree)
        v.backup(next_tree(tree, s.rng, 1))


@workload("vault-forget-prune", device_bytes=VAULT_BYTES, seeds=3, outcomes=6)
def vault_forget_prune(s: Session) -> None:
    """Two backups of a changing tree (setup, not cut), then a forget of the older snapshot and a
    prune (with its compaction), cut after every write; vault invariants (13)-(17)."""
    with VaultRun(s) as v:
        tree = first_tree(s.rng)
        v.init()
        v.backup(tree)
        v.backup(next_tree(tree, s.rng, 1))
        v.cut_from_here()
        v.forget_oldest()
        v.prune()
