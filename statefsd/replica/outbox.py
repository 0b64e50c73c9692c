"""Push: the image's committed history, read through statefsd's ``feed``,
written into the outbox as sealed segments and a signed head.

Files land under a temporary name outside the outbox and are renamed in,
so Syncthing and rclone never see half a file; a head is written only
after every segment it lists, and it is the only place a push's progress
is kept, so an interrupted push simply runs again from the last head.

Before it reads anything new, a push checks the image against its own
last head: an image whose newest transaction is older than what this
device already replicated, or whose log no longer holds the point the
head recorded, was rolled back or replaced, and the push refuses
(EROLLBACK) instead of publishing an older or different history.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from statefsd.errors import Busy, InvalidArgument, KeyUnavailable, RolledBack
from statefsd.replica import format as rfmt
from statefsd.replica.verify import read_heads
from statefsd.vault import kv as kvmod
from statefsd.vault import records as vrec

FEED_BYTES = 8 << 20
HEAD_EVERY_SEGMENTS = 64        # a long push publishes progress this often (resumable)
HEADS_KEPT = 4                  # older heads of this device are retired
RETIRED_KEPT = 4096             # names a head still announces as retired
KEY_RECORD_PREFIXES = (vrec.CONFIG_KEY, vrec.KEYSLOT_PREFIX, vrec.DEVICE_PREFIX)


@dataclass
class Policy:
    segment_bytes: int = rfmt.DEFAULT_SEGMENT_BYTES
    keep_generations: int = 2

    def check(self) -> None:
        problem = rfmt.check_segment_bytes(self.segment_bytes)
        if problem:
            raise InvalidArgument(problem, hint="pick a segment size such as 1M")
        if self.keep_generations < 1:
            raise InvalidArgument("keep at least one generation", hint="set keep_generations to 1 or more")


@dataclass
class PushResult:
    counter: int
    segments_written: int = 0
    bytes_written: int = 0
    txns: int = 0
    last_txn: int = 0
    generation: int = 0
    retired: list[str] = field(default_factory=list)
    heads_written: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def atomic_write(outbox: Path, rel: str, data: bytes) -> None:
    tmp_dir = outbox.parent / (outbox.name + ".tmp")
    tmp_dir.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=rel.replace("/", "_") + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    target = outbox / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def key_records(kv: kvmod.KV) -> dict[str, bytes]:
    names = [vrec.CONFIG_KEY]
    for prefix in KEY_RECORD_PREFIXES[1:]:
        names += list(kvmod.iter_keys(kv, prefix))
    got = kv.mget(names)
    return {name: value[0] for name, value in zip(names, got) if value is not None}


class _SegmentWriter:
    def __init__(self, outbox: Path, keys: rfmt.ReplicaKeys, policy: Policy, segments: list[rfmt.SegmentEntry],
                 next_seq: int, generation: int, result: PushResult) -> None:
        self.outbox, self.keys, self.size = outbox, keys, policy.segment_bytes
        self.room = rfmt.capacity(self.size)
        self.segments = segments
        self.next_seq = next_seq
        self.generation = generation
        self.flags = 0
        self.buf = bytearray()
        self.result = result
        self.since_head = 0
        self.push_id = os.urandom(16)

    def start_generation(self, generation: int) -> None:
        self.flush()
        self.generation, self.flags = generation, rfmt.FLAG_GENERATION_START

    def add(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= self.room:
            self._write(bytes(self.buf[:self.room]))
            del self.buf[:self.room]

    def flush(self) -> None:
        """Write what is buffered (it ends on a transaction boundary)."""
        if self.buf:
            self._write(bytes(self.buf))
            self.buf.clear()

    def _write(self, stream: bytes) -> None:
        seq = self.next_seq
        prev = self.segments[-1].digest if self.segments else bytes(rfmt.DIGEST_BYTES)
        header = rfmt.SegmentHeader(seq, self.generation, self.flags, len(stream), prev)
        sealed = rfmt.seal_segment(self.keys, header, stream, self.size)
        name = rfmt.segment_name(self.keys, seq, self.push_id)
        atomic_write(self.outbox, name, sealed)
        self.segments.append(rfmt.SegmentEntry(name, rfmt.file_digest(sealed)))
        self.next_seq, self.flags = seq + 1, 0
        self.since_head += 1
        self.result.segments_written += 1
        self.result.bytes_written += len(sealed)


def last_own_head(outbox: Path, signer: bytes) -> rfmt.Head | None:
    heads = [h for h in read_heads(outbox, []) if h.signer == signer]
    return heads[-1] if heads else None


@contextlib.contextmanager
def exclusive_push(outbox: Path):
    """One push at a time per outbox: two would write two heads with one
    counter (a fork on every copy) and retire each other's segments."""
    outbox.mkdir(parents=True, exist_ok=True)
    fd = os.open(outbox.parent / (outbox.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"another push into {outbox} is running (`statefs replicate run`, or a push by hand)",
                       hint="wait for it to finish, or stop `statefs replicate run` before pushing by hand") from None
        yield
    finally:
        os.close(fd)


def push(client, vault, outbox: Path, policy: Policy, *, feed_bytes: int = FEED_BYTES) -> PushResult:
    """One push; returns what it wrote. ``vault`` is the opened vault of
    the image (its keys seal the replica; its device signs the head)."""
    with exclusive_push(outbox):
        return push_locked(client, vault, outbox, policy, feed_bytes)


def push_locked(client, vault, outbox: Path, policy: Policy, feed_bytes: int = FEED_BYTES) -> PushResult:
    """push() for a caller that holds exclusive_push(outbox) (and sends the
    outbox to the engines under the same lock)."""
    policy.check()
    if vault.device is None:
        raise KeyUnavailable("a push signs its head with the device key, and no keystored was given",
                             hint="start keystored and set $STATEFS_KEYSTORE_SOCKET (or --keystore-socket)")
    keys = rfmt.ReplicaKeys.derive(vault.keys)
    signer = vault.device.public_key
    keys_file = rfmt.encode_keys_file(key_records(vault.kv))
    if _read(outbox / rfmt.KEYS_FILE) != keys_file:
        atomic_write(outbox, rfmt.KEYS_FILE, keys_file)

    prev = last_own_head(outbox, signer)
    if prev is not None:
        state = rfmt.open_head_state(keys, prev)
        segments, retired, counter = list(prev.segments), list(prev.retired), prev.counter
    else:
        state, segments, retired, counter = rfmt.HeadState(first_seq=0), [], [], 0
    result = PushResult(counter=counter, last_txn=state.last_txn)
    # Segments an interrupted push wrote but no head lists: engines may have
    # copied them already, so they leave through the next head's retirements.
    listed = {s.name for s in segments}
    leftovers = [f"{rfmt.SEGMENT_DIR}/{p.name}" for p in sorted((outbox / rfmt.SEGMENT_DIR).glob("*"))
                 if rfmt.is_segment_name(f"{rfmt.SEGMENT_DIR}/{p.name}")
                 and f"{rfmt.SEGMENT_DIR}/{p.name}" not in listed]

    gen = state.generations[-1] if state.generations else None
    writer = _SegmentWriter(outbox, keys, policy, segments, state.first_seq + len(segments),
                            gen["gen"] if gen else 0, result)
    snapshots = set(state.snapshots)
    cursor = state.cursor or None
    while True:
        try:
            page = client.feed(after=state.last_txn if cursor else 0, cursor=cursor, max_bytes=feed_bytes)
        except InvalidArgument as exc:
            raise _rolled_back(f"the image's log no longer holds txn {state.last_txn}, the point this device "
                               f"last replicated ({exc.message})") from None
        if prev is not None and page["max_txn"] < state.last_txn:
            # Txn ids only grow, across compactions too: a newer image never
            # has a newest txn below what was already replicated.
            raise _rolled_back(f"the image's newest txn is {page['max_txn']}, older than txn {state.last_txn} "
                               f"that this device already replicated (head {prev.counter})")
        if page["reset"]:
            writer.start_generation(writer.generation + 1)
            # A history that starts from an empty store has no base to wait
            # for: every transaction of it is a restorable point.
            gen = {"gen": writer.generation, "first_seq": writer.next_seq, "first_txn": 0,
                   "base_end_txn": 1 if page["from_empty"] else 0, "last_txn": 0}
            state.generations.append(gen)
            snapshots.clear()
        for txn_id, chain, changes in page["txns"]:
            writer.add(rfmt.encode_txn(txn_id, chain, changes))
            gen["first_txn"] = gen["first_txn"] or txn_id
            gen["last_txn"], gen["chain"] = txn_id, chain
            state.last_txn, state.chain = txn_id, chain
            result.txns += 1
            for key, value in changes:
                if key.startswith(vrec.SNAPSHOT_PREFIX):
                    (snapshots.discard if value is None else snapshots.add)(key)
        cursor = page["cursor"]
        state.cursor, state.epoch, state.max_txn = cursor, page["epoch"], page["max_txn"]
        if not page["more"]:
            break
        if writer.since_head >= HEAD_EVERY_SEGMENTS:
            writer.flush()      # progress a resumed push starts from; the base is not complete yet
            counter = _write_head(outbox, vault, keys, counter, state, writer, snapshots, retired, policy, result)
    writer.flush()
    if gen is not None and not gen["base_end_txn"] and state.last_txn:
        gen["base_end_txn"] = state.last_txn    # everything up to the engine's position: the base is whole
    if prev is None or result.txns or writer.since_head or leftovers:
        counter = _write_head(outbox, vault, keys, counter, state, writer, snapshots, retired, policy, result,
                              retire=True, leftovers=leftovers)
    result.counter, result.last_txn, result.generation = counter, state.last_txn, writer.generation
    return result


def _rolled_back(what: str) -> RolledBack:
    return RolledBack(f"{what}: the image was rolled back or replaced; nothing was pushed",
                      hint="do not write to this image; compare it with `statefs replicate status` "
                           "and restore the newest copy with `statefs restore`")


def _write_head(outbox: Path, vault, keys: rfmt.ReplicaKeys, counter: int, state: rfmt.HeadState,
                writer: _SegmentWriter, snapshots: set[str], retired: list[str], policy: Policy,
                result: PushResult, *, retire: bool = False, leftovers: list[str] = ()) -> int:
    counter += 1
    gone: list[str] = []
    if retire:
        gone = list(leftovers) + _retire_generations(state, writer.segments, policy)
        older = [h for h in read_heads(outbox, []) if h.signer == vault.device.public_key]
        gone += [rfmt.head_name(h.signer, h.counter) for h in older[:max(0, len(older) + 1 - HEADS_KEPT)]]
    retired[:] = (retired + gone)[-RETIRED_KEPT:]
    state.snapshots, state.time_ns = sorted(snapshots), time.time_ns()
    signer = vault.device.public_key
    head = rfmt.Head(keys.replica_id, signer, counter, list(writer.segments), list(retired),
                     rfmt.file_digest((outbox / rfmt.KEYS_FILE).read_bytes()),
                     rfmt.seal_head_state(keys, counter, state))
    body = rfmt.encode_head_body(head)
    signature = vault.device.signer.sign(rfmt.HEAD_SIGN_LABEL, rfmt.head_signing_bytes(body))
    atomic_write(outbox, rfmt.head_name(signer, counter), rfmt.encode_head_file(body, signature))
    _log_head(outbox, counter, state)
    for name in gone:       # only after a signed head says so
        try:
            (outbox / name).unlink()
        except FileNotFoundError:
            pass
    writer.since_head = 0
    result.heads_written += 1
    result.retired += gone
    return counter


HEAD_LOG = "heads.jsonl"


def _log_head(outbox: Path, counter: int, state: rfmt.HeadState) -> None:
    """Which txn each head reached, beside the outbox (never replicated):
    status turns a copy's head counter into transactions behind."""
    line = json.dumps({"counter": counter, "last_txn": state.last_txn, "time_ns": state.time_ns})
    with open(outbox.parent / HEAD_LOG, "a") as f:
        f.write(line + "\n")


def head_txns(outbox: Path) -> dict[int, int]:
    """Head counter -> the txn it reached, from the head log (lines that do
    not parse, e.g. one cut by a crash, are skipped)."""
    found: dict[int, int] = {}
    try:
        lines = (outbox.parent / HEAD_LOG).read_text().splitlines()
    except FileNotFoundError:
        return found
    for line in lines:
        try:
            entry = json.loads(line)
            found[int(entry["counter"])] = int(entry["last_txn"])
        except (ValueError, KeyError, TypeError):
            continue
    return found


def _retire_generations(state: rfmt.HeadState, segments: list[rfmt.SegmentEntry], policy: Policy) -> list[str]:
    """Generations older than the newest ``keep_generations`` whole ones
    leave the head: their segments are retired."""
    whole = [g for g in state.generations if g["base_end_txn"]]
    if len(whole) <= policy.keep_generations:
        return []
    oldest_kept = whole[-policy.keep_generations]
    drop = oldest_kept["first_seq"] - state.first_seq
    gone = [s.name for s in segments[:drop]]
    del segments[:drop]
    state.first_seq = oldest_kept["first_seq"]
    state.generations = [g for g in state.generations if g["gen"] >= oldest_kept["gen"]]
    return gone


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
