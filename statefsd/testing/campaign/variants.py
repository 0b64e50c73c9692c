"""Deliberately broken variants of the engine: proof that the campaign can fail.

Each variant changes one thing, in campaign code only (the storage core is not
touched, and nothing is monkeypatched: the real engine keeps running
unchanged in the same process):

* ``lying-disk``: the disk acknowledges flush() without making anything
  durable, so commits return while their group is still volatile (1).
* ``no-crc``: the log reader accepts records whose CRC does not match, so a
  torn record is taken for a good one (5, 1).
* ``visible-before-commit``: records reach the replayer as they are read,
  not one complete group at a time, and each PUT becomes visible as soon as
  its last chunk is in, before its COMMIT (2).
* ``txn-id-reuse``: a mount continues from the highest txn id in the log,
  ignoring the reservation, so the id of a lost transaction is used again
  (8), and with encryption its nonces too (10).
* ``vault-split-snapshot``: the engine is the real one, but the vault's
  adapter commits a snapshot record apart from, and before, the count of its
  root, so a cut between the two leaves a visible snapshot whose root counts
  no reference (vault workloads: (14), (15)).

``rebind`` copies a function with some of its module globals replaced; the
copy is used only by the variant, the module keeps its own.
"""

from __future__ import annotations

import types

from statefsd.storage import format as fmt
from statefsd.storage import logscan
from statefsd.storage import replay as replay_mod
from statefsd.storage.engine import Engine
from statefsd.storage.index import Entry
from statefsd.storage.replay import Replayer

from statefsd.testing.campaign.systems import DeviceProxy, System
from statefsd.testing.vaultkv import SplitSnapshotKV


def rebind(fn: types.FunctionType, **names) -> types.FunctionType:
    """A copy of ``fn`` that sees ``names`` in place of the module globals of those names."""
    scope = dict(fn.__globals__)
    scope.update(names)
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _engine_with_replay(name: str, replay_fn) -> type[Engine]:
    mount = rebind(Engine.__dict__["_mount"].__func__, replay=replay_fn)
    return type(name, (Engine,), {"_mount": classmethod(mount)})


# -- lying disk ---------------------------------------------------------------------------------


class LyingDisk(DeviceProxy):
    """flush() returns at once; nothing becomes durable."""

    def flush(self) -> None:
        pass


class LyingDiskSystem(System):
    name = "lying-disk"
    description = "the disk acknowledges flushes without making writes durable"

    def wrap(self, device):
        return LyingDisk(device)


# -- log reader without CRC checks ------------------------------------------------------------------


class _Matches(int):
    """A checksum that equals every stored checksum."""

    def __eq__(self, other) -> bool:
        return True

    def __ne__(self, other) -> bool:
        return False

    __hash__ = int.__hash__


_trusting_fmt = types.SimpleNamespace(**vars(fmt))
_trusting_fmt.record_crc = lambda header, payload: _Matches(0)
_scan_without_crc = rebind(logscan.scan_groups, _read_group=rebind(
    logscan._read_group, _check=rebind(logscan._check, fmt=_trusting_fmt)))


class NoCrcSystem(System):
    name = "no-crc"
    description = "the log reader trusts records without checking their CRC"
    engine_class = _engine_with_replay("NoCrcEngine", rebind(replay_mod.replay, scan_groups=_scan_without_crc))


# -- visible before COMMIT --------------------------------------------------------------------------


def _scan_streaming(device, sb, *, upto=None):
    """Like logscan.scan_groups, but hands out each record as soon as it is read."""
    start, length = sb.active_extent
    window = logscan._Window(device, start, start + length if upto is None else upto)
    cur = logscan._Cursor()
    pos = group_start = start
    group_seq = 0
    while True:
        rec, reason = logscan._check(window, pos, sb, cur)
        if rec is None:
            break
        yield [rec]
        cur.seq += 1
        pos = rec.end
        if rec.header.flags & fmt.FLAG_GROUP_END:
            cur.group, cur.mount_gen = rec.header.group, rec.header.mount_gen
            pos = group_start = fmt.align_up(pos) + (fmt.PARITY_TRAILER_SIZE if sb.redundancy else 0)
            group_seq = cur.seq
    end = logscan.ScanEnd(offset=group_start, next_seq=group_seq, next_group=cur.group + 1,
                          mount_gen=cur.mount_gen, stop_offset=pos, stop_reason=reason,
                          torn_bytes=pos - group_start)
    logscan.decide_stop(window, sb, end)
    yield end


class _EarlyReplayer(Replayer):
    """Makes each PUT visible once its last chunk is read, before the COMMIT."""

    def apply(self, rec) -> None:
        super().apply(rec)
        txn, h = self.open, rec.header
        if h.type != fmt.PAYLOAD or txn is None or self.stopped or txn.prepare.header.txn_id != h.txn_id:
            return
        op = txn.ops[h.op_index]
        if txn.next_chunk[h.op_index] == op.chunk_count:
            self.index[op.path] = Entry(h.txn_id, op.value_len, tuple(txn.chunks[h.op_index]), txn.sealed)


class VisibleBeforeCommitSystem(System):
    name = "visible-before-commit"
    description = "the replayer applies a transaction's puts before reading its COMMIT"
    engine_class = _engine_with_replay(
        "EarlyEngine", rebind(replay_mod.replay, scan_groups=_scan_streaming, Replayer=_EarlyReplayer))


# -- txn ids reused after a remount ----------------------------------------------------------------


class _ReusingEngine(Engine):
    def __init__(self, device, sb, sb_slot, result, **kwargs) -> None:
        super().__init__(device, sb, sb_slot, result, **kwargs)
        # ignores sb.txn_reserved (invariant 8)
        self.log.position = self.log.position._replace(next_txn=result.max_txn_id + 1)


class TxnIdReuseSystem(System):
    name = "txn-id-reuse"
    description = "a mount continues from the last txn id in the log, not above the reservation"
    engine_class = _ReusingEngine


# -- a vault whose snapshot is visible before its root is counted -----------------------------------


class SplitSnapshotSystem(System):
    name = "vault-split-snapshot"
    description = "the vault commits a snapshot record before, and apart from, its root's count"
    vault_kv = SplitSnapshotKV


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls for cls in (System, LyingDiskSystem, NoCrcSystem, VisibleBeforeCommitSystem, TxnIdReuseSystem,
                              SplitSnapshotSystem)
}
