"""A simulated block device with a volatile write cache: the one crash injector.

Every write lands in a volatile cache until the next ``flush()``; a power cut
decides, per unflushed ("pending") write, what reached the medium. Tests and
the power-loss campaign never fake a crash any other way.

Model (after SQLite's test6.c crash VFS and CrashMonkey):

1. ``read`` sees every earlier write; ``flush`` makes every earlier write durable.
2. A power cut never touches flushed data, and never changes a byte outside
   the ranges of pending writes ("powersafe overwrite").
3. Each pending write gets one :class:`Fate`: KEEP (landed whole), DROP (not at
   all), TORN (a subset of its 512-byte sectors landed, optionally plus a byte
   prefix of one more sector: a *partial sector*) or GARBAGE (its range holds
   deterministic junk). An :class:`Outcome` is the fates plus the order in
   which the surviving writes landed, which decides overlapping sectors.
4. A :class:`CrashModel` narrows what a cut may do, so a run states which disk
   it assumed; a device refuses outcomes outside its model.

Workflow of the campaign: run a workload once on a ``SimulatedDevice``; its
:class:`Trace` records every write and flush. ``trace.crash_points()`` walks
the trace and yields a :class:`CrashPoint` after every op (durable snapshot +
pending writes); ``point.outcomes(limit=..., rng=seed)`` enumerates or samples
cut outcomes; ``point.device(outcome)`` builds the crashed device. A failure
is reproduced from (workload seed, trace index, ``outcome.encode()``) with
``SimulatedDevice.replay(trace, upto=index).power_cut(code)``.

Storage is copy-on-write in chunks of ``chunk_size`` bytes: snapshots and
crashed devices share every chunk they do not modify, so building a crash
state costs the chunks the landed writes touch, not the image size.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import math
import random
import re
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Sequence

from statefsd.storage.blockdev import SECTOR, BlockDevice
from statefsd.errors import InvalidArgument

CHUNK_SIZE = 64 * 1024          # copy-on-write unit: small enough to copy, big enough to read across
SUBSET_SECTORS = 4              # writes of up to this many sectors tear into every sector subset
EXHAUSTIVE_CUT = SECTOR // 2    # byte cut of a partial sector in exhaustive enumeration
MAX_EXHAUSTIVE = 1_000_000      # without a limit, refuse spaces larger than this
MAX_ORDER_GROUP = 4             # overlap groups up to this size are permuted exhaustively
MAX_DECODED_FATES = 1 << 20     # a decoded outcome code may not describe more writes
_SEED_LIMIT = 1 << 64


# ----------------------------------------------------------------------------------------------
# Crash model


@dataclass(frozen=True)
class CrashModel:
    """Which power-cut behaviours the simulated disk may show.

    Defaults are the most adversarial disk. Implications are applied, so the
    fields always state the effective model: ``atomic_sectors`` rules out
    garbage (a sector is old or new, nothing else) and partial sectors;
    ``in_order`` rules out reordering.
    """

    atomic_sectors: bool = False  # each 512-byte sector lands whole or not at all
    in_order: bool = False        # writes land in issue order: survivors are a prefix
    allow_garbage: bool = True    # a pending write may leave junk over its range
    allow_reorder: bool = True    # overlapping pending writes may land in any order
    allow_tear: bool = True       # a multi-sector write may land partly

    FLAGS = ("atomic_sectors", "in_order", "garbage", "reorder", "tear")

    def __post_init__(self) -> None:
        for name in ("atomic_sectors", "in_order", "allow_garbage", "allow_reorder", "allow_tear"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"CrashModel.{name} must be a bool")
        if self.atomic_sectors:
            object.__setattr__(self, "allow_garbage", False)
        if self.in_order:
            object.__setattr__(self, "allow_reorder", False)

    @property
    def allow_partial(self) -> bool:
        """Whether a write may leave one sector with only a byte prefix landed."""
        return self.allow_tear and not self.atomic_sectors

    def spec(self) -> str:
        """Compact form for command lines: the enabled flags, comma-separated."""
        on = [self.atomic_sectors, self.in_order, self.allow_garbage, self.allow_reorder, self.allow_tear]
        names = [name for name, flag in zip(self.FLAGS, on) if flag]
        return ",".join(names) or "none"

    @classmethod
    def from_spec(cls, text: str) -> "CrashModel":
        """Inverse of :meth:`spec`; flags not named are off ("none": all off)."""
        names = {part.strip() for part in text.split(",") if part.strip()}
        if names == {"none"}:
            names = set()
        unknown = names - set(cls.FLAGS)
        if unknown or not text.strip():
            raise InvalidArgument(f"bad crash model {text!r}: use 'none' or a comma list of "
                                  f"{', '.join(cls.FLAGS)}")
        return cls(atomic_sectors="atomic_sectors" in names, in_order="in_order" in names,
                   allow_garbage="garbage" in names, allow_reorder="reorder" in names,
                   allow_tear="tear" in names)

    def describe(self) -> str:
        """One sentence naming the disk this model assumes."""
        parts = ["survivors are a prefix of the unflushed writes (in-order disk)" if self.in_order
                 else "any subset of the unflushed writes survives"]
        if not self.allow_tear:
            parts.append("each write lands whole or not at all")
        elif self.allow_partial:
            parts.append("writes tear per sector and mid-sector")
        else:
            parts.append("writes tear at 512-byte sector boundaries only")
        parts.append("garbage possible" if self.allow_garbage else "no garbage")
        if self.allow_reorder:
            parts.append("overlapping writes land in any order")
        return f"CrashModel({self.spec()}): " + "; ".join(parts)

    def check(self, outcome: "Outcome", pending: Sequence) -> None:
        """Raise InvalidArgument unless ``outcome`` fits ``pending`` and this model."""
        shapes = _shapes(pending)
        if len(outcome.fates) != len(shapes):
            raise InvalidArgument(f"outcome covers {len(outcome.fates)} writes but {len(shapes)} are pending")
        for i, (fate, (_, length)) in enumerate(zip(outcome.fates, shapes)):
            nsec = length // SECTOR
            if fate.kind is FateKind.TORN:
                if not self.allow_tear:
                    raise InvalidArgument(f"write {i} is torn but model {self.spec()} forbids tearing")
                if fate.mask >> nsec:
                    raise InvalidArgument(f"write {i} has {nsec} sectors; torn mask {fate.mask:#x} is wider")
                if fate.partial is not None:
                    if not self.allow_partial:
                        raise InvalidArgument(f"write {i} has a partial sector but model {self.spec()} "
                                              "has atomic sectors or no tearing")
                    if fate.partial[0] >= nsec:
                        raise InvalidArgument(f"write {i} has {nsec} sectors; partial sector "
                                              f"{fate.partial[0]} is outside it")
            elif fate.kind is FateKind.GARBAGE and not self.allow_garbage:
                raise InvalidArgument(f"write {i} is garbage but model {self.spec()} forbids garbage")
        if outcome.order is not None and not self.allow_reorder:
            raise InvalidArgument(f"outcome reorders writes but model {self.spec()} forbids reordering")
        if self.in_order:
            kinds = [f.kind for f in outcome.fates]
            survivors = sum(1 for k in itertools.takewhile(lambda k: k is FateKind.KEEP, kinds))
            rest = kinds[survivors + 1:] if survivors < len(kinds) else []
            if any(k is not FateKind.DROP for k in rest):
                raise InvalidArgument("in-order model: the surviving writes must be a prefix "
                                      f"(only its last may be torn), got {outcome.encode()}")


# ----------------------------------------------------------------------------------------------
# Outcomes


class FateKind(enum.Enum):
    KEEP = "K"
    DROP = "D"
    TORN = "T"
    GARBAGE = "G"


@dataclass(frozen=True)
class Fate:
    """What a power cut did to one pending write.

    TORN: bit ``i`` of ``mask`` set means sector ``i`` of the write landed;
    ``partial=(sector, nbytes)`` additionally landed the first ``nbytes`` of
    that sector (a sector torn mid-way; only for non-atomic sectors).
    GARBAGE: the write's range holds junk from ``seed``; seed 0 means zeros
    (sectors the disk lost and reads back as zero), 1 means 0xff (erased
    flash), others deterministic pseudo-random bytes.
    """

    kind: FateKind
    mask: int = 0
    partial: tuple[int, int] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, FateKind):
            raise InvalidArgument(f"bad fate kind {self.kind!r}")
        if self.kind is not FateKind.TORN and (self.mask or self.partial is not None):
            raise InvalidArgument("only a torn write has a sector mask or a partial sector")
        if self.kind is not FateKind.GARBAGE and self.seed:
            raise InvalidArgument("only a garbage write has a seed")
        if not 0 <= self.mask:
            raise InvalidArgument(f"bad torn mask {self.mask}")
        if not 0 <= self.seed < _SEED_LIMIT:
            raise InvalidArgument(f"garbage seed {self.seed} outside 0..2**64-1")
        if self.partial is not None:
            sector, nbytes = self.partial
            if sector < 0 or not 0 < nbytes < SECTOR:
                raise InvalidArgument(f"bad partial sector {self.partial}: need sector >= 0, 0 < bytes < {SECTOR}")
            if self.mask >> sector & 1:
                raise InvalidArgument(f"partial sector {sector} is already fully landed by the mask")

    @classmethod
    def torn(cls, mask: int, partial: tuple[int, int] | None = None) -> "Fate":
        return cls(FateKind.TORN, mask=mask, partial=partial)

    @classmethod
    def garbage(cls, seed: int) -> "Fate":
        return cls(FateKind.GARBAGE, seed=seed)

    def encode(self) -> str:
        if self.kind is FateKind.TORN:
            mask = self.mask
            text = f"P{mask.bit_length()}" if mask & (mask + 1) == 0 else f"T{mask:x}"
            if self.partial is not None:
                text += f"+{self.partial[0]}.{self.partial[1]}"
            return text
        if self.kind is FateKind.GARBAGE:
            return f"G{self.seed:x}"
        return self.kind.value

    def pieces(self, offset: int, data: bytes) -> Iterator[tuple[int, bytes | memoryview]]:
        """(device offset, bytes) that landed on the medium for a write of ``data`` at ``offset``."""
        if self.kind is FateKind.KEEP:
            yield offset, data
        elif self.kind is FateKind.GARBAGE:
            yield offset, garbage_bytes(self.seed, offset, len(data))
        elif self.kind is FateKind.TORN:
            view = memoryview(data)
            for first, count in _bit_runs(self.mask):
                yield offset + first * SECTOR, view[first * SECTOR:(first + count) * SECTOR]
            if self.partial is not None:
                sector, nbytes = self.partial
                yield offset + sector * SECTOR, view[sector * SECTOR:sector * SECTOR + nbytes]

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Byte ranges [start, end) this fate lands, for ordering overlapping writes."""
        if self.kind is FateKind.DROP:
            return []
        if self.kind is not FateKind.TORN:
            return [(offset, offset + length)]
        runs = [(offset + a * SECTOR, offset + (a + b) * SECTOR) for a, b in _bit_runs(self.mask)]
        if self.partial is not None:
            start = offset + self.partial[0] * SECTOR
            runs.append((start, start + self.partial[1]))
        return runs


KEEP = Fate(FateKind.KEEP)
DROP = Fate(FateKind.DROP)


def garbage_bytes(seed: int, offset: int, length: int) -> bytes:
    """The junk a GARBAGE fate leaves: a pure function of (seed, offset, length)."""
    if seed == 0:
        return bytes(length)
    if seed == 1:
        return b"\xff" * length
    key = b"statefs.simdev.garbage\0" + seed.to_bytes(8, "little") + offset.to_bytes(8, "little")
    return hashlib.shake_128(key).digest(length)


_TOKEN = re.compile(r"(K|D|G[0-9a-f]{1,16}|P\d{1,9}|T[0-9a-f]{1,65536})(?:\+(\d{1,9})\.(\d{1,3}))?(?:x(\d{1,9}))?")


@dataclass(frozen=True)
class Outcome:
    """The fate of every pending write plus their landing order.

    ``order`` is a permutation of the pending indices (``None``: issue order);
    it only matters where surviving writes overlap: the later one wins.
    Encoded as fate tokens (``K`` keep, ``D`` drop, ``P<n>`` first n sectors
    landed, ``T<hexmask>`` those sectors landed, ``+<sector>.<bytes>`` a partial
    sector, ``G<hexseed>`` garbage, ``x<n>`` repeats), then ``/`` and the order
    as ranges, e.g. ``Kx3P2+2.256DG5/0,2,1,3-5``.
    """

    fates: tuple[Fate, ...]
    order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fates", tuple(self.fates))
        if self.order is not None:
            order = tuple(self.order)
            if sorted(order) != list(range(len(self.fates))):
                raise InvalidArgument(f"outcome order {order} is not a permutation of the "
                                      f"{len(self.fates)} pending writes")
            identity = all(i == v for i, v in enumerate(order))
            object.__setattr__(self, "order", None if identity else order)

    @classmethod
    def keep_all(cls, n: int) -> "Outcome":
        return cls((KEEP,) * n)

    @classmethod
    def drop_all(cls, n: int) -> "Outcome":
        return cls((DROP,) * n)

    def landing_order(self) -> Iterable[int]:
        return self.order if self.order is not None else range(len(self.fates))

    def encode(self) -> str:
        tokens = [f.encode() for f in self.fates]
        out = []
        for token, group in itertools.groupby(tokens):
            count = len(list(group))
            out.append(f"{token}x{count}" if count >= 3 else token * count)
        text = "".join(out) or "_"
        if self.order is not None:
            text += "/" + encode_ranges(self.order)
        return text

    @classmethod
    def decode(cls, text: str) -> "Outcome":
        if not isinstance(text, str) or len(text) > 1 << 20:
            raise InvalidArgument("outcome code must be a string of reasonable length")
        fates_text, sep, order_text = text.strip().partition("/")
        fates: list[Fate] = []
        if fates_text != "_":
            pos = 0
            while pos < len(fates_text):
                m = _TOKEN.match(fates_text, pos)
                if not m:
                    raise InvalidArgument(f"bad outcome code {text!r}: cannot read {fates_text[pos:pos + 12]!r}")
                fate = _decode_token(m, text)
                count = int(m.group(4)) if m.group(4) else 1
                if count < 1 or len(fates) + count > MAX_DECODED_FATES:
                    raise InvalidArgument(f"bad outcome code {text!r}: repeat count {count}")
                fates.extend([fate] * count)
                pos = m.end()
            if not fates:
                raise InvalidArgument(f"bad outcome code {text!r}: empty (use '_' for no pending writes)")
        order = _decode_ranges(order_text, text) if sep else None
        return cls(tuple(fates), order)

    def __str__(self) -> str:
        return self.encode()


def _decode_token(m: re.Match, text: str) -> Fate:
    head = m.group(1)
    partial = (int(m.group(2)), int(m.group(3))) if m.group(2) is not None else None
    try:
        if head in ("K", "D"):
            if partial is not None:
                raise InvalidArgument("a kept or dropped write has no partial sector")
            return KEEP if head == "K" else DROP
        if head[0] == "G":
            if partial is not None:
                raise InvalidArgument("a garbage write has no partial sector")
            return Fate.garbage(int(head[1:], 16))
        mask = (1 << int(head[1:])) - 1 if head[0] == "P" else int(head[1:], 16)
        return Fate.torn(mask, partial)
    except InvalidArgument as exc:
        raise InvalidArgument(f"bad outcome code {text!r}: {exc.message}") from None


def encode_ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5": compact, for outcome codes and reports."""
    parts = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def _decode_ranges(order_text: str, text: str) -> tuple[int, ...]:
    values: list[int] = []
    for part in order_text.split(","):
        m = re.fullmatch(r"(\d{1,9})(?:-(\d{1,9}))?", part)
        if not m:
            raise InvalidArgument(f"bad outcome code {text!r}: bad order item {part!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo or len(values) + hi - lo + 1 > MAX_DECODED_FATES:
            raise InvalidArgument(f"bad outcome code {text!r}: bad order range {part!r}")
        values.extend(range(lo, hi + 1))
    return tuple(values)


def _bit_runs(mask: int) -> Iterator[tuple[int, int]]:
    """(first bit, run length) of each run of set bits, lowest first."""
    pos = 0
    while mask:
        zeros = (mask & -mask).bit_length() - 1
        mask >>= zeros
        pos += zeros
        ones = (~mask & (mask + 1)).bit_length() - 1
        yield pos, ones
        mask >>= ones
        pos += ones


# ----------------------------------------------------------------------------------------------
# Enumeration


def _shapes(pending: Sequence) -> list[tuple[int, int]]:
    """(offset, length) of each pending write: PendingWrite, or (offset, data|length) pairs."""
    shapes = []
    for item in pending:
        offset, payload = item[0], item[1]
        length = payload if isinstance(payload, int) else len(payload)
        if offset % SECTOR or length % SECTOR or length <= 0:
            raise InvalidArgument(f"pending write at {offset} length {length} is not sector aligned")
        shapes.append((offset, length))
    return shapes


def _exhaustive_fates(nsec: int, model: CrashModel, *, survivors: bool = True) -> list[Fate]:
    """The fates tried for one write in exhaustive mode (KEEP/DROP first if ``survivors``)."""
    fates = [KEEP, DROP] if survivors else []
    if model.allow_tear:
        full = (1 << nsec) - 1
        masks = range(1, full) if nsec <= SUBSET_SECTORS else [(1 << k) - 1 for k in range(1, nsec)]
        fates += [Fate.torn(m) for m in masks]
        if model.allow_partial:
            fates += [Fate.torn((1 << k) - 1, (k, EXHAUSTIVE_CUT)) for k in range(nsec)]
    if model.allow_garbage:
        fates += [Fate.garbage(0), Fate.garbage(2)]
    return fates


def _overlap_groups(fates: Sequence[Fate], shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Groups (size >= 2) of writes whose landed bytes overlap, by a sweep over extents."""
    extents = sorted((start, end, i) for i, (fate, (off, length)) in enumerate(zip(fates, shapes))
                     for start, end in fate.extents(off, length))
    parent = list(range(len(fates)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reach, owner = -1, -1
    for start, end, i in extents:
        if start < reach:
            parent[root(i)] = root(owner)
        if end > reach:
            reach, owner = end, i
    groups: dict[int, list[int]] = {}
    for i in {i for _, _, i in extents}:
        groups.setdefault(root(i), []).append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _overlapping_pairs(fates, shapes, group: list[int]) -> list[tuple[int, int]]:
    ext = {i: fates[i].extents(*shapes[i]) for i in group}
    return [(a, b) for a, b in itertools.combinations(group, 2)
            if any(s1 < e2 and s2 < e1 for s1, e1 in ext[a] for s2, e2 in ext[b])]


def _orders(fates, shapes) -> Iterator[tuple[int, ...] | None]:
    """Every landing order that changes who wins an overlapping byte (issue order first)."""
    groups = _overlap_groups(fates, shapes)
    if not groups:
        yield None
        return
    pairs = [p for g in groups for p in _overlapping_pairs(fates, shapes, g)]
    seen = set()
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        order = list(range(len(fates)))
        for group, perm in zip(groups, perms):
            for slot, value in zip(group, perm):
                order[slot] = value
        rank = {v: r for r, v in enumerate(order)}
        signature = tuple(rank[a] < rank[b] for a, b in pairs)
        if signature not in seen:
            seen.add(signature)
            yield tuple(order)


def _space_bound(shapes, model: CrashModel) -> int:
    """Upper bound of the exhaustive space; huge if reorder groups are too big to permute."""
    per_write = [len(_exhaustive_fates(length // SECTOR, model)) for _, length in shapes]
    if model.in_order:
        return 1 + sum(n - 1 for n in per_write)
    bound = math.prod(per_write)
    if model.allow_reorder:
        for group in _overlap_groups([KEEP] * len(shapes), shapes):
            if len(group) > MAX_ORDER_GROUP:
                return MAX_EXHAUSTIVE * 1000 + bound
            bound *= math.factorial(len(group))
    return bound


def _exhaustive(shapes, model: CrashModel) -> Iterator[Outcome]:
    n = len(shapes)
    if model.in_order:
        for k in range(n, -1, -1):
            yield Outcome((KEEP,) * k + (DROP,) * (n - k))
            if k < n:
                for fate in _exhaustive_fates(shapes[k][1] // SECTOR, model, survivors=False):
                    yield Outcome((KEEP,) * k + (fate,) + (DROP,) * (n - k - 1))
        return
    choices = [_exhaustive_fates(length // SECTOR, model) for _, length in shapes]
    for fates in itertools.product(*choices):
        if model.allow_reorder:
            for order in _orders(fates, shapes):
                yield Outcome(fates, order)
        else:
            yield Outcome(fates)


def _structured(n: int, model: CrashModel, rng: random.Random, budget: int) -> Iterator[Outcome]:
    """Outcomes that find most bugs (CrashMonkey): all kept, none, each prefix, each single
    loss; thinned evenly by ``rng`` to ``budget`` (all kept and none always come first)."""
    prefixes = list(range(n - 1, 0, -1))
    losses = [] if model.in_order else list(range(n - 1))
    specs = [("prefix", k) for k in prefixes] + [("loss", i) for i in losses]
    if len(specs) > budget - 2:
        specs = [specs[i] for i in sorted(rng.sample(range(len(specs)), max(0, budget - 2)))]
    yield Outcome.keep_all(n)
    yield Outcome.drop_all(n)
    for kind, k in specs:
        if kind == "prefix":
            yield Outcome((KEEP,) * k + (DROP,) * (n - k))
        else:
            yield Outcome((KEEP,) * k + (DROP,) + (KEEP,) * (n - k - 1))


def _random_torn(rng: random.Random, nsec: int, model: CrashModel) -> Fate:
    style = rng.randrange(3)
    if style == 0:          # a prefix landed: the usual tear of a sequential transfer
        mask = (1 << rng.randrange(nsec)) - 1
    elif style == 1:        # a suffix landed
        k = rng.randrange(1, nsec) if nsec > 1 else 0
        mask = ((1 << nsec) - 1) ^ ((1 << k) - 1)
    else:                   # any subset
        mask = rng.getrandbits(nsec)
    partial = None
    if model.allow_partial and rng.random() < 0.5:
        sector = mask.bit_length() if style == 0 else rng.randrange(nsec)
        if sector < nsec and not mask >> sector & 1:
            partial = (sector, rng.randrange(1, SECTOR))
    if mask == (1 << nsec) - 1 and partial is None:
        return KEEP
    if mask == 0 and partial is None:
        return DROP
    return Fate.torn(mask, partial)


def _random_anomaly(rng: random.Random, nsec: int, model: CrashModel) -> Fate:
    """A fate other than KEEP, drawn among what the model allows."""
    kinds = [FateKind.DROP]
    if model.allow_tear and (nsec > 1 or model.allow_partial):
        kinds.append(FateKind.TORN)
    if model.allow_garbage:
        kinds.append(FateKind.GARBAGE)
    kind = rng.choice(kinds)
    if kind is FateKind.TORN:
        return _random_torn(rng, nsec, model)
    if kind is FateKind.GARBAGE:
        return Fate.garbage(rng.choice((0, 1, rng.getrandbits(32) | 2)))
    return DROP


def _random_outcome(rng: random.Random, shapes, model: CrashModel) -> Outcome:
    n = len(shapes)
    if model.in_order:
        k = rng.randrange(n + 1)
        fates = [KEEP] * k + [DROP] * (n - k)
        if k < n and rng.random() < 0.5:
            fates[k] = _random_anomaly(rng, shapes[k][1] // SECTOR, model)
        return Outcome(tuple(fates))
    p_keep = rng.random()
    fates = tuple(KEEP if rng.random() < p_keep else _random_anomaly(rng, length // SECTOR, model)
                  for _, length in shapes)
    if not model.allow_reorder:
        return Outcome(fates)
    order = list(range(n))
    for group in _overlap_groups(fates, shapes):
        perm = group[:]
        rng.shuffle(perm)
        for slot, value in zip(group, perm):
            order[slot] = value
    return Outcome(fates, tuple(order))


def _as_rng(rng: random.Random | int | None) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if rng is None or isinstance(rng, int):
        return random.Random(rng or 0)
    raise InvalidArgument(f"rng must be a seed or random.Random, not {type(rng).__name__}")


def enumerate_outcomes(pending: Sequence, model: CrashModel = CrashModel(), *,
                       limit: int | None = None,
                       rng: random.Random | int | None = None) -> Iterator[Outcome]:
    """Yield power-cut outcomes of ``pending`` allowed by ``model``.

    When the exhaustive space is at most ``limit`` (or ``limit`` is None and the
    space is at most MAX_EXHAUSTIVE) every outcome is yielded: each write kept,
    dropped, torn at each sector subset (prefixes only past SUBSET_SECTORS),
    torn mid-sector, garbled to zeros or junk, in every distinct landing order.
    Otherwise ``limit`` distinct outcomes: the structured ones first (all kept,
    none, each prefix, each single loss; thinned to half the budget), then a
    sample drawn from ``rng`` (a seed or Random; default seed 0). The same
    arguments always yield the same sequence.
    """
    shapes = _shapes(pending)
    if limit is not None and limit < 1:
        raise InvalidArgument(f"outcome limit must be positive, got {limit}")
    bound = _space_bound(shapes, model)
    if limit is None and bound > MAX_EXHAUSTIVE:
        raise InvalidArgument(f"{len(shapes)} pending writes give over {MAX_EXHAUSTIVE} outcomes; "
                              "pass limit= to sample")
    if limit is None or bound <= limit:
        yield from _exhaustive(shapes, model)
        return
    rng = _as_rng(rng)
    seen = set()
    produced = 0
    for outcome in _structured(len(shapes), model, rng, max(2, limit // 2)):
        code = outcome.encode()
        if produced < limit and code not in seen:
            seen.add(code)
            produced += 1
            yield outcome
    attempts = 0
    while produced < limit and attempts < 20 * limit:
        attempts += 1
        outcome = _random_outcome(rng, shapes, model)
        code = outcome.encode()
        if code not in seen:
            seen.add(code)
            produced += 1
            yield outcome


# ----------------------------------------------------------------------------------------------
# Trace and crash points


class PendingWrite(NamedTuple):
    """An unflushed write: where, what, and which trace op issued it."""

    offset: int
    data: bytes
    op_index: int = -1

    @property
    def length(self) -> int:
        return len(self.data)


class TraceOp(NamedTuple):
    index: int
    kind: str       # "write" or "flush"
    offset: int
    length: int
    data: bytes

    def __repr__(self) -> str:
        if self.kind == "flush":
            return f"#{self.index} flush"
        return f"#{self.index} write {self.offset}+{self.length}"


class Trace:
    """Every write and flush a device saw, from its initial image on.

    ``replay(upto=N)`` rebuilds the device after the first N ops: writes before
    the last flush among them are durable, the later ones pending.
    """

    def __init__(self, size: int, chunk_size: int, initial: tuple, model: CrashModel) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.model = model
        self._initial = initial
        self.ops: list[TraceOp] = []

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[TraceOp]:
        return iter(self.ops)

    def __getitem__(self, index):
        return self.ops[index]

    def initial_image(self) -> bytes:
        return b"".join(self._initial)

    def replay(self, upto: int | None = None) -> "SimulatedDevice":
        upto = len(self.ops) if upto is None else upto
        if not 0 <= upto <= len(self.ops):
            raise InvalidArgument(f"trace index {upto} outside 0..{len(self.ops)}")
        dev = SimulatedDevice._from_chunks(self.size, self._initial, self.chunk_size, self.model)
        for op in self.ops[:upto]:
            dev._apply_op(op)
        return dev

    def crash_points(self, start: int = 0, stop: int | None = None) -> Iterator["CrashPoint"]:
        """The crash point after each of ops start..stop (index N: the first N ops ran).

        One pass over the trace; each point shares chunks with the others.
        """
        stop = len(self.ops) if stop is None else stop
        if not 0 <= start <= stop <= len(self.ops):
            raise InvalidArgument(f"crash point range {start}..{stop} outside 0..{len(self.ops)}")
        dev = SimulatedDevice._from_chunks(self.size, self._initial, self.chunk_size, self.model, record=False)
        for index in range(stop + 1):
            if index >= start:
                yield dev.crash_point()
            if index < stop:
                dev._apply_op(self.ops[index])


@dataclass(frozen=True, eq=False)
class CrashPoint:
    """Durable state plus pending writes at one moment: the input of a power cut."""

    index: int
    size: int
    model: CrashModel
    _durable: tuple = field(repr=False)
    _pending_src: list = field(repr=False)
    _npending: int = 0
    _chunk: int = CHUNK_SIZE

    @property
    def pending(self) -> tuple[PendingWrite, ...]:
        return tuple(self._pending_src[:self._npending])

    def outcomes(self, *, limit: int | None = None, rng: random.Random | int | None = None,
                 model: CrashModel | None = None) -> Iterator[Outcome]:
        return enumerate_outcomes(self.pending, model or self.model, limit=limit, rng=rng)

    def device(self, outcome: Outcome | str, *, model: CrashModel | None = None,
               record: bool = True) -> "SimulatedDevice":
        """A fresh device holding what the medium has after ``outcome``: nothing pending,
        a new trace (if ``record``) starting from the crashed image."""
        if isinstance(outcome, str):
            outcome = Outcome.decode(outcome)
        pending = self.pending
        (model or self.model).check(outcome, pending)
        dev = SimulatedDevice._from_chunks(self.size, self._durable, self._chunk, model or self.model,
                                           record=False)
        for i in outcome.landing_order():
            write = pending[i]
            for offset, data in outcome.fates[i].pieces(write.offset, write.data):
                dev._poke(offset, data)
        dev._record = record
        dev._start_fresh()
        return dev

    def durable_image(self) -> bytes:
        return b"".join(self._durable)


# ----------------------------------------------------------------------------------------------
# The device


class SimulatedDevice(BlockDevice):
    """In-memory block device with a volatile write cache (see the module docstring).

    ``image`` gives the initial (durable) contents; ``size`` may then be None.
    Reads outside the device are refused, unlike a file (a simulated disk is
    strict so that engine bugs show).
    """

    def __init__(self, size: int | None = None, *, model: CrashModel = CrashModel(),
                 image: bytes | None = None, chunk_size: int = CHUNK_SIZE, record: bool = True,
                 path: str = "<simdev>") -> None:
        if size is None:
            if image is None:
                raise InvalidArgument("give a size or an image")
            size = len(image)
        if not isinstance(size, int) or size <= 0 or size % SECTOR:
            raise InvalidArgument(f"device size {size} is not a positive multiple of {SECTOR}")
        if chunk_size <= 0 or chunk_size % SECTOR:
            raise InvalidArgument(f"chunk size {chunk_size} is not a positive multiple of {SECTOR}")
        if image is not None and len(image) != size:
            raise InvalidArgument(f"image of {len(image)} bytes does not match device size {size}")
        if not isinstance(model, CrashModel):
            raise InvalidArgument("model must be a CrashModel")
        if image is None:
            zero = bytes(chunk_size)
            chunks = [zero if start + chunk_size <= size else bytes(size - start)
                      for start in range(0, size, chunk_size)]
        else:
            view = memoryview(image)
            chunks = [bytes(view[start:start + chunk_size]) for start in range(0, size, chunk_size)]
        self._setup(size, chunks, chunk_size, model, record, path)

    @classmethod
    def _from_chunks(cls, size: int, chunks: Sequence, chunk_size: int, model: CrashModel, *,
                     record: bool = True) -> "SimulatedDevice":
        dev = cls.__new__(cls)
        dev._setup(size, list(chunks), chunk_size, model, record, "<simdev>")
        return dev

    def _setup(self, size, chunks: list, chunk_size, model, record, path) -> None:
        self.size = size
        self.path = path
        self.model = model
        self._chunk = chunk_size
        self._cur = chunks              # current view: chunks owned (mutable) or shared (never mutated)
        self._owned: set[int] = set()   # chunk indices this device may mutate in place
        self._lock = threading.Lock()
        self._record = record
        self._start_fresh()

    def _start_fresh(self) -> None:
        """Everything current is durable; a new trace starts from it."""
        self._durable = tuple(self._cur)
        self._owned.clear()
        self._pending: list[PendingWrite] = []
        self._ops = 0                   # ops since this device's initial image
        self._trace = Trace(self.size, self._chunk, self._durable, self.model) if self._record else None

    # -- BlockDevice -------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"read at {offset} length {length} outside device of {self.size} bytes")
        if length == 0:
            return b""
        ci, co = divmod(offset, self._chunk)
        end = co + length
        if end <= self._chunk:
            chunk = self._cur[ci]
            return chunk[co:end] if type(chunk) is bytes else bytes(memoryview(chunk)[co:end])
        parts = []
        while length > 0:
            take = min(self._chunk - co, length)
            parts.append(memoryview(self._cur[ci])[co:co + take])
            length -= take
            ci, co = ci + 1, 0
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        self._check_write(offset, len(data))
        data = bytes(data)  # the caller may reuse its buffer; the trace must not change
        with self._lock:
            self._poke(offset, data)
            index = self._log("write", offset, data)
            self._pending.append(PendingWrite(offset, data, index))

    def flush(self) -> None:
        with self._lock:
            self._log("flush", 0, b"")
            self._durable = tuple(self._cur)
            self._owned.clear()          # the durable snapshot now shares every chunk
            self._pending = []           # a new list: crash points keep views of the old one

    # -- crash API ---------------------------------------------------------------------------

    @property
    def trace(self) -> Trace:
        if self._trace is None:
            raise InvalidArgument("this device does not record a trace (record=False)")
        return self._trace

    @property
    def pending(self) -> tuple[PendingWrite, ...]:
        return tuple(self._pending)

    def crash_point(self) -> CrashPoint:
        """Durable snapshot plus pending writes now, after op ``self._ops``; O(1)."""
        with self._lock:
            return CrashPoint(self._ops, self.size, self.model, self._durable, self._pending,
                              len(self._pending), self._chunk)

    def outcomes(self, *, limit: int | None = None, rng: random.Random | int | None = None) -> Iterator[Outcome]:
        return enumerate_outcomes(self.pending, self.model, limit=limit, rng=rng)

    def power_cut(self, outcome: Outcome | str) -> "SimulatedDevice":
        """The device after a power cut with ``outcome``; this device is left as it was."""
        return self.crash_point().device(outcome)

    def durable_image(self) -> bytes:
        return b"".join(self._durable)

    def image(self) -> bytes:
        """The current view (durable plus pending writes)."""
        return b"".join(self._cur)

    @classmethod
    def from_image(cls, image: bytes, *, model: CrashModel = CrashModel(), **kwargs) -> "SimulatedDevice":
        return cls(len(image), model=model, image=image, **kwargs)

    @classmethod
    def replay(cls, trace: Trace, upto: int | None = None) -> "SimulatedDevice":
        return trace.replay(upto)

    def __repr__(self) -> str:
        return (f"SimulatedDevice({self.size} bytes, {len(self._pending)} pending, "
                f"model={self.model.spec()})")

    # -- internals ---------------------------------------------------------------------------

    def _log(self, kind: str, offset: int, data: bytes) -> int:
        """Count the op (traced or not, so op indices agree with replay) and trace it."""
        index = self._ops
        self._ops += 1
        if self._trace is not None:
            self._trace.ops.append(TraceOp(index, kind, offset, len(data), data))
        return index

    def _apply_op(self, op: TraceOp) -> None:
        if op.kind == "write":
            self.write(op.offset, op.data)
        elif op.kind == "flush":
            self.flush()
        else:
            raise InvalidArgument(f"unknown trace op kind {op.kind!r}")

    def _poke(self, offset: int, data) -> None:
        """Store bytes at any offset, copying shared chunks first (no alignment rule)."""
        view = memoryview(data)
        size, cur, owned = self._chunk, self._cur, self._owned
        ci, co = divmod(offset, size)
        pos, n = 0, len(view)
        while pos < n:
            take = min(size - co, n - pos)
            if ci not in owned:
                if co == 0 and take == len(cur[ci]):
                    cur[ci] = bytearray(view[pos:pos + take])   # whole chunk: no need to copy the old one
                    owned.add(ci)
                    pos, ci, co = pos + take, ci + 1, 0
                    continue
                cur[ci] = bytearray(cur[ci])
                owned.add(ci)
            cur[ci][co:co + take] = view[pos:pos + take]
            pos, ci, co = pos + take, ci + 1, 0
