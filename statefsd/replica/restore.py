"""Restore: a new image from one or more copies of a replica, with only
the vault's passphrase or recovery secret.

Nothing from a copy is served before it is verified end to end: the key
file opens only with the secret and its config MAC must hold; a head
counts only when signed by a device the vault lists; every segment must
match the digest the head signs, open under the replica key, carry the
expected sequence number, generation and predecessor digest; transaction
ids must rise and, at the newest point, the StateFS chain must equal the
one the head recorded. A segment missing or damaged in one copy is read
from another; a copy whose newest head is older than another's is named
stale. The image is written under a temporary name and renamed only when
complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from statefsd.errors import IntegrityError, InvalidArgument, NotFound, StateFSError
from statefsd.replica import format as rfmt
from statefsd.replica.verify import fork_problems, read_heads
from statefsd.vault import records as vrec
from statefsd.vault import vault as vaultmod

MIN_IMAGE_BYTES = 64 << 20
APPLY_BYTES = 4 << 20           # source txns are applied in batches of about this much value data


class RecordsKV:
    """The vault records of a key file, read-only, as the vault's KV."""

    def __init__(self, records: dict[str, bytes]) -> None:
        self.records = records

    def mget(self, keys: list[str]):
        return [(self.records[k], 0) if k in self.records else None for k in keys]

    def list_page(self, prefix: str, after: str | None, limit: int):
        keys = sorted(k for k in self.records if k.startswith(prefix) and (after is None or k > after))
        return keys[:limit], len(keys) > limit

    def apply(self, ops, expect=()):
        raise InvalidArgument("a key file is read-only")

    def compact(self) -> dict:
        return {}

    def verify(self) -> dict:
        return {}

    def clone(self):
        return None

    def close(self) -> None:
        pass


@dataclass
class Source:
    path: Path
    label: str
    heads: list[rfmt.Head] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Opened:
    """A replica's trusted head and what it seals, from the best copies."""

    vault: vaultmod.Vault
    keys: rfmt.ReplicaKeys
    head: rfmt.Head
    state: rfmt.HeadState
    sources: list[Source]
    stale: list[str]
    problems: list[str]


def open_replica(sources: Iterable[tuple[Path, str]], secret: vaultmod.Secret) -> Opened:
    copies = [Source(Path(p), label) for p, label in sources]
    if not copies:
        raise InvalidArgument("no copy to restore from", hint="pass --from PEER_DIR or --from REMOTE")
    for src in copies:
        src.heads = read_heads(src.path, src.problems)
    vault, keys = _open_keys(copies, secret)
    trusted = _trusted_signers(vault, copies)
    problems: list[str] = []
    for src in copies:
        problems += [f"{src.label}: {p}" for p in src.problems + fork_problems(src.heads)]
        forged = [h for h in src.heads if h.signer not in trusted]
        problems += [f"{src.label}: head {h.counter} is signed by a key this vault does not list" for h in forged]
        src.heads = [h for h in src.heads if h.signer in trusted and h.replica_id == keys.replica_id]
    every = [h for src in copies for h in src.heads]
    problems += fork_problems(sorted(every, key=lambda h: h.counter))
    if any(p.startswith("fork") or ": fork" in p for p in problems):
        raise IntegrityError("two different histories are signed for this replica: " +
                             "; ".join(p for p in problems if "fork" in p),
                             hint="find out which device wrote the other history before restoring")
    if not every:
        raise NotFound("no head signed by a device of this vault in " + ", ".join(s.label for s in copies),
                       hint="check the copy's path, or that a push has completed on the source device")
    head, state = _newest(every, keys, problems)
    if not any(_keys_digest(src) == head.keys_digest for src in copies):
        problems.append(f"no copy holds the key file head {head.counter} names (key slots changed since); "
                        f"the vault's data is unaffected")
    stale = [src.label for src in copies if not any(h.signer == head.signer for h in src.heads)
             or max(h.counter for h in src.heads if h.signer == head.signer) < head.counter]
    return Opened(vault, keys, head, state, copies, stale, problems)


def _newest(heads: list[rfmt.Head], keys: rfmt.ReplicaKeys, problems: list[str]) -> tuple[rfmt.Head, rfmt.HeadState]:
    """The newest head of each signing device; of several devices (a device
    restored onto a new machine goes on under a new key, its counter from 1),
    the one written last."""
    newest: dict[bytes, rfmt.Head] = {}
    for h in heads:
        if h.signer not in newest or h.counter > newest[h.signer].counter:
            newest[h.signer] = h
    opened = [(h, rfmt.open_head_state(keys, h)) for h in newest.values()]
    if len(opened) > 1:
        problems.append("heads of " + ", ".join(f"{rfmt.device_tag(h.signer)} (head {h.counter})"
                                                   for h, _ in opened)
                        + ": the one written last is restored")
    return max(opened, key=lambda pair: pair[1].time_ns)


def _open_keys(copies: list[Source], secret: vaultmod.Secret) -> tuple[vaultmod.Vault, rfmt.ReplicaKeys]:
    failure: StateFSError | None = None
    for src in copies:
        try:
            raw = (src.path / rfmt.KEYS_FILE).read_bytes()
        except OSError:
            continue
        try:
            records = rfmt.decode_keys_file(raw)
            vault = vaultmod.open_vault(RecordsKV(records), secret, None)
        except StateFSError as exc:
            if exc.code.name == "EPASSPHRASE":
                raise
            failure = exc
            continue
        return vault, rfmt.ReplicaKeys.derive(vault.keys)
    if failure is not None:
        raise failure
    raise NotFound(f"no copy holds {rfmt.KEYS_FILE}", hint="is this a StateFS replica? pass the outbox's copy")


def _keys_digest(src: Source) -> bytes | None:
    try:
        return rfmt.file_digest((src.path / rfmt.KEYS_FILE).read_bytes())
    except OSError:
        return None


def _trusted_signers(vault: vaultmod.Vault, copies: list[Source]) -> set[bytes]:
    """Every device record sealed under this vault's key, in any copy's key
    file: an older key file (a stale or hostile copy) cannot hide a device
    that a newer one lists."""
    keys = set()
    for src in copies:
        try:
            records = rfmt.decode_keys_file((src.path / rfmt.KEYS_FILE).read_bytes())
        except (OSError, StateFSError):
            continue
        view = vaultmod.Vault(RecordsKV(records), vault.keys, vault.config, None)
        for name in view.kv.list_page(vrec.DEVICE_PREFIX, None, 1 << 30)[0]:
            try:
                public = view.device_public_key(name[len(vrec.DEVICE_PREFIX):])
            except StateFSError:
                continue        # not sealed under this vault's key: ignored
            if public is not None:
                keys.add(public)
    return keys


# ------------------------------------------------------------------ choosing the point

@dataclass
class Target:
    generation: dict
    txn: int                # apply up to and including this txn
    first_seq: int
    end_seq: int            # exclusive
    latest: bool


def choose(opened: Opened, at: str | None) -> Target:
    state = opened.state
    whole = [g for g in state.generations if g.get("base_end_txn")]
    if not whole:
        raise NotFound("the replica holds no complete state yet", hint="let a push finish on the source device")
    last_seq = state.first_seq + len(opened.head.segments)

    def target(g: dict, txn: int) -> Target:
        later = [h for h in state.generations if h["gen"] > g["gen"]]
        end = later[0]["first_seq"] if later else last_seq
        return Target(g, txn, g["first_seq"], end, txn == g["last_txn"])

    if at is None or at == "latest":
        return target(whole[-1], whole[-1]["last_txn"])
    kind, _, value = at.partition(":") if ":" in at else ("txn" if at.isdigit() else "snapshot", "", at)
    if kind not in ("txn", "snapshot") or not value:
        raise InvalidArgument(f"--at {at!r} is neither a txn id nor a snapshot ID",
                              hint="give latest, a txn id, a snapshot ID, or txn:N / snapshot:ID to say which")
    if kind == "txn":
        if not value.isdigit():
            raise InvalidArgument(f"--at {at!r}: a txn id is a number", hint="e.g. --at txn:4106")
        txn = int(value)
        for g in whole:
            if max(g["base_end_txn"], g["first_txn"]) <= txn <= g["last_txn"]:
                return target(g, txn)
        ranges = ", ".join(f"{max(g['base_end_txn'], g['first_txn'])}-{g['last_txn']}" for g in whole)
        raise NotFound(f"txn {txn} is not within the replica's retention (restorable txns: {ranges})",
                       hint="pick a txn in those ranges, or a snapshot ID")
    return _snapshot_target(opened, value, whole, target)


def _snapshot_target(opened: Opened, ref: str, whole: list[dict], target) -> Target:
    """The point right after the snapshot's record was committed: found by
    reading the retained generations' streams."""
    ref = ref.lower()
    for g in whole:
        t = target(g, g["last_txn"])
        for txn_id, _chain, changes in _stream(opened, t):
            hit = any(v is not None and k.startswith(vrec.SNAPSHOT_PREFIX + ref) for k, v in changes)
            if hit:
                return target(g, max(txn_id, g["base_end_txn"]))
    raise NotFound(f"no snapshot {ref!r} within the replica's retention",
                   hint="list snapshots with `statefs vault snapshots` on a restored image")


# ------------------------------------------------------------------ reading segments

def read_segment(opened: Opened, seq: int, entry: rfmt.SegmentEntry, events: list[str]) -> bytes:
    """The segment's file from the first copy where it matches its signed digest."""
    for src in opened.sources:
        try:
            path = src.path / entry.name
            if path.stat().st_size > rfmt.MAX_SEGMENT_BYTES:
                events.append(f"{src.label}: {entry.name} damaged (larger than any segment)")
                continue
            data = path.read_bytes()
        except OSError:
            events.append(f"{src.label}: {entry.name} missing")
            continue
        if rfmt.file_digest(data) == entry.digest:
            return data
        events.append(f"{src.label}: {entry.name} damaged (digest mismatch)")
    raise IntegrityError(f"segment {seq} ({entry.name}) is missing or damaged in every copy",
                         hint="add another copy with a second --from")


def _stream(opened: Opened, t: Target, events: list[str] | None = None):
    """Transactions of the target's generation, verified, in order, up to t.txn."""
    events = [] if events is None else events
    if t.txn == 0:
        return          # nothing was ever committed: the empty state
    state, head = opened.state, opened.head
    decoder = rfmt.StreamDecoder()
    prev_digest = None
    for seq in range(t.first_seq, t.end_seq):
        entry = head.segments[seq - state.first_seq]
        data = read_segment(opened, seq, entry, events)
        header, stream = rfmt.open_segment(opened.keys, seq, data)
        starts = seq == t.first_seq
        if header.generation != t.generation["gen"] or bool(header.flags & rfmt.FLAG_GENERATION_START) != starts:
            raise IntegrityError(f"segment {seq} belongs to generation {header.generation}, not where the head "
                                 f"places it", hint="restore from another copy")
        if prev_digest is not None and header.prev_digest != prev_digest:
            raise IntegrityError(f"segment {seq} does not follow segment {seq - 1}", hint="restore from another copy")
        prev_digest = entry.digest
        for txn in decoder.feed(stream):
            if txn[0] > t.txn:
                return          # ids have gaps: the state as of t.txn is the one before this txn
            yield txn
            if txn[0] == t.txn:
                return
    raise IntegrityError(f"txn {t.txn} is not in the replica's stream (ends at txn {decoder.last_txn})",
                         hint="restore from another copy, or pick another point")


# ------------------------------------------------------------------ writing the image

def restore(opened: Opened, target: Target, image: str, *, size: int | None = None) -> dict:
    from statefsd.storage import format as fmt
    from statefsd.storage.blockdev import FileDevice, create_image
    from statefsd.storage.engine import Engine, Mutation

    if os.path.exists(image):
        raise InvalidArgument(f"{image} exists; restore writes a new image",
                              hint="pass a new --image path, or move the old one away")
    events: list[str] = []
    if target.end_seq > target.first_seq:
        first = read_segment(opened, target.first_seq, opened.head.segments[target.first_seq - opened.state.first_seq],
                             events)      # verified against the signed digest: its size can be trusted
        segment_bytes = len(first)
    else:
        segment_bytes = 0
    # The log keeps two regions (compaction writes the live state into the
    # other one): room for three times the generation's stream.
    stream_bytes = (target.end_seq - target.first_seq) * segment_bytes
    size = size or max(MIN_IMAGE_BYTES, _round_mib(stream_bytes * 3))
    partial = image + ".partial"
    applied = txns = 0
    last_chain = b""
    try:
        create_image(partial, size)
        with FileDevice(partial) as device:
            Engine.mkfs(device)
        engine = Engine.mount(FileDevice(partial))
        try:
            # Later writes of a key replace earlier ones in the batch: the
            # state after the batch is the state after its last source txn.
            batch: dict[str, Mutation] = {}
            batch_bytes = 0
            for _txn_id, chain, changes in _stream(opened, target, events):
                for key, value in changes:
                    batch.pop(key, None)
                    batch[key] = Mutation("delete", key) if value is None else Mutation("put", key, value)
                    batch_bytes += len(value or b"")
                txns += 1
                last_chain = chain
                if batch_bytes >= APPLY_BYTES or len(batch) >= 4 * fmt.MAX_TXN_OPS:
                    applied += _commit(engine, list(batch.values()))
                    batch, batch_bytes = {}, 0
            applied += _commit(engine, list(batch.values()))
            keys = len(engine.list(""))
        finally:
            engine.close()
        if target.latest and last_chain != target.generation.get("chain", opened.state.chain):
            raise IntegrityError("the restored history's chain head differs from the one the head signs",
                                 hint="restore from another copy")
        os.replace(partial, image)
    except BaseException:
        _remove(partial)
        raise
    return {"image": image, "txn": target.txn, "generation": target.generation["gen"], "txns": txns,
            "keys": keys, "head": opened.head.counter, "stale_copies": opened.stale,
            "fetched_elsewhere": events, "problems": opened.problems}


def _commit(engine, batch: list) -> int:
    """Source transactions coalesced; each commit keeps to the limits."""
    from statefsd.storage import format as fmt
    from statefsd.storage.engine import mutation_op

    if not batch:
        return 0
    done = 0
    for part in fmt.split_into_transactions(batch, lambda m: mutation_op(m)[0]):
        engine.commit(part)
        done += 1
    return done


def _round_mib(n: int) -> int:
    return (n + (1 << 20) - 1) >> 20 << 20


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
