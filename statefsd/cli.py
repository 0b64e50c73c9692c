"""statefs: the command line for StateFS.

    statefs mkfs IMAGE --size 64M [--encryption on|off] [--redundancy parity|off] [--force]
    statefs [--socket PATH] put KEY VALUE | put KEY --file F | put KEY -   [--json | -v]
    statefs [--socket PATH] get KEY [-o FILE] (raw value bytes on stdout or into FILE)
    statefs [--socket PATH] rm KEY                                          [--json | -v]
    statefs [--socket PATH] ls [PREFIX] [-l] [--json | -0]
    statefs [--socket PATH] txn [FILE|-]     (JSON, see TXN_HELP)           [--json | -v]
    statefs [--socket PATH] stat [KEY] [--json]   (a key's stat, or the daemon's info)
    statefs [--socket PATH] compact
    statefs [--socket PATH] verify [--json]   (exit 0 clean, 4 problems found, 8 not verified)

Writes are quiet on success, as Unix tools are: ``--json`` prints
``{"txn": ID}``, ``-v`` a line saying what was done. The socket comes from
--socket or $STATEFS_SOCKET. Failures print ``statefs: <NAME>: message
(hint)`` on stderr and exit with the numeric code of errors.Code; argparse
usage errors exit 2 (EUSAGE).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import json
import os
import stat
import sys

from statefsd.errors import (
    DeviceIOError, FsckExit, InternalError, InvalidArgument, StateFSError, UsageError,
)
from statefsd.replica import cli as replica_cli
from statefsd.vault import cli as vault_cli


TXN_HELP = """\
The transaction is one JSON object; its ops apply all together or not at all:

  {"ops": [{"op": "put",    "key": "net/ip",  "value": "10.0.0.2"},
           {"op": "put",    "key": "fw/blob", "value_b64": "AAEC/w=="},
           {"op": "delete", "key": "net/old"}]}

  "value"      the value as UTF-8 text
  "value_b64"  the value as base64, for bytes that are not text
  a put has exactly one of the two; a delete of a missing key is not an error.
  "expect"     optional: [{"key": "net/ip", "txn": 41}, ...] commits only if
               each key was last written by that txn ('statefs stat KEY';
               0: the key is absent), else nothing is written: ECONFLICT, exit 27.
Limits: 128 ops and 16 MiB of values per transaction, 8 MiB per value,
512 bytes per key (docs/statefs.md).

example:
  echo '{"ops":[{"op":"put","key":"a","value":"1"}]}' | statefs txn -
"""


def _write_options(p: argparse.ArgumentParser) -> None:
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help='print {"txn": ID}, the committed transaction\'s id')
    out.add_argument("-v", "--verbose", action="store_true", help="say what was done")


def build_parser() -> argparse.ArgumentParser:
    # --socket is accepted before or after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help="statefsd socket (default: $STATEFS_SOCKET)")
    parser = argparse.ArgumentParser(prog="statefs", parents=[common],
                                     description="Use a StateFS key-value store.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("mkfs", help="format an image file or block device")
    p.add_argument("image")
    p.add_argument("--size", help="create an image file of this size (suffix K, M, G or T), e.g. 64M; "
                                  "it is written with zeros up front unless --sparse")
    p.add_argument("--sparse", action="store_true",
                   help="with --size: create the file sparse (instant, no space used until written); "
                        "the cost: a commit that first writes into a hole also flushes file-system "
                        "metadata, so early commits are slower")
    p.add_argument("--encryption", choices=("on", "off"),
                   default=os.environ.get("STATEFS_ENCRYPTION", "off"),
                   help="encrypt values at rest (default: $STATEFS_ENCRYPTION or off)")
    p.add_argument("--redundancy", choices=("parity", "off"), default="parity",
                   help="parity (default): a parity trailer after every write group rebuilds any one "
                        "damaged sector of it; off: damage is detected, not repaired")
    p.add_argument("--force", action="store_true", help="overwrite an existing StateFS image")

    p = sub.add_parser("put", parents=[common], help="store a value (quiet on success)")
    p.add_argument("key")
    p.add_argument("value", nargs="?", help="the value as text, or - to read stdin")
    p.add_argument("--file", help="read the value from this file")
    _write_options(p)

    p = sub.add_parser("get", parents=[common], help="print a value's raw bytes")
    p.add_argument("key")
    p.add_argument("-o", "--output", metavar="FILE", help="write the value to FILE instead of stdout")

    p = sub.add_parser("rm", parents=[common], help="delete a key (quiet on success)")
    p.add_argument("key")
    _write_options(p)

    p = sub.add_parser("ls", parents=[common], help="list keys")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("-l", dest="long", action="store_true",
                   help="long listing: size in bytes, id of the transaction that wrote it, key")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="a JSON array (of objects with -l)")
    out.add_argument("-0", dest="null", action="store_true",
                     help="end each key with NUL instead of newline (keys may contain newlines)")

    p = sub.add_parser("txn", parents=[common], help="apply a JSON transaction atomically (quiet on success)",
                       description="Apply a JSON transaction atomically.", epilog=TXN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", default="-", help="JSON file, or - for stdin (default)")
    _write_options(p)

    p = sub.add_parser("stat", parents=[common], help="a key's stat, or the daemon's info")
    p.add_argument("key", nargs="?")
    p.add_argument("--json", action="store_true", help="print the raw fields as JSON")

    sub.add_parser("compact", parents=[common], help="compact the log now")

    p = sub.add_parser("verify", parents=[common], help="scrub the mounted log online (fsck-style exit status)",
                       description="Re-read the mounted log up to now and check every record, the hash "
                                   "chain and every signed checkpoint, while statefsd keeps serving.",
                       epilog="exit status (as fsck(8)): 0 clean, 4 problems found (see findings), "
                              "8 not verified (statefsd unreachable, or it is shutting down)")
    p.add_argument("--json", action="store_true", help="print the verify map as JSON")
    vault_cli.add_parser(sub, common)
    replica_cli.add_parsers(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        vault_cli.refuse_extra(args, extra)    # `vault check` answers usage errors as fsck(8) does
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except StateFSError as exc:
        return _fail(exc)
    except BrokenPipeError:  # e.g. `statefs get k | head -c1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug; keep the promised error line shape
        return _fail(InternalError(f"{type(exc).__name__}: {exc}"))


def _fail(exc: StateFSError) -> int:
    print(f"statefs: {exc.code.name}: {exc.message} ({exc.hint})", file=sys.stderr)
    return int(exc.code)


# ------------------------------------------------------------------- mkfs

def cmd_mkfs(args: argparse.Namespace) -> int:
    from statefsd.storage.blockdev import FileDevice, create_image, parse_size
    from statefsd.storage.engine import Engine

    path = args.image
    size = parse_size(args.size) if args.size else None
    if args.sparse and size is None:
        raise UsageError("--sparse goes with --size", hint="add --size to create a sparse image file")
    existed = check_safe_to_format(path, size=size, force=args.force)
    try:
        if size is not None:
            try:
                create_image(path, size, sparse=args.sparse)
            except OSError as exc:
                raise DeviceIOError(f"cannot create {path}: {exc.strerror}",
                                    hint="check the directory's permissions and free space") from None
        with FileDevice(path) as device:
            sb = Engine.mkfs(device, encryption=args.encryption, redundancy=args.redundancy)
            size = device.size
    except BaseException:
        if not existed:  # a failed mkfs leaves nothing behind that it created
            _remove_quietly(path)
        raise
    print(_mkfs_summary(path, size, sb, args.encryption, args.redundancy))
    return 0


def _mkfs_summary(path: str, size: int, sb, encryption: str, redundancy: str) -> str:
    """What a newcomer needs to size an image: how much of it holds data."""
    from statefsd.storage.format import MAX_KEY_BYTES, MAX_TXN_BYTES, MAX_VALUE_BYTES

    log = sb.regions[sb.active_region][1] * sb.block_size
    return (f"statefs: formatted {path}: {size} bytes ({_human(size)}), encryption {encryption}, "
            f"redundancy {redundancy}\n"
            f"  log capacity: {log} bytes ({_human(log)}) usable; the device holds two log regions, "
            f"one live and one that receives compaction\n"
            f"  limits: a value up to {_human(MAX_VALUE_BYTES)}, a key up to {MAX_KEY_BYTES} bytes, "
            f"a transaction up to {_human(MAX_TXN_BYTES)} of values")


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------- mkfs: is the target safe to format?
#
# mkfs is meant for /dev/vda as much as for image files, so a typo must not
# destroy a file system, a partition table or somebody's notes. Everything
# that decides whether formatting may go ahead lives here.

# Whole-target scans stop being cheap on big disks; past this size only the
# head and tail are read, where partition tables, file-system superblocks
# and LUKS headers live (blkid still probes the whole signature set).
_SCAN_ALL_BYTES = 1 << 30
_SCAN_EDGE_BYTES = 64 << 20


def check_safe_to_format(path: str, *, size: int | None, force: bool) -> bool:
    """Refuse a target mkfs must not touch; return whether it already exists.

    An absent file (with --size) or an existing all-zero file or device is
    fine. Anything holding a StateFS image, a signature blkid knows (file
    system, partition table, LUKS, swap) or any non-zero byte is refused
    unless ``force``. An image held by statefsd or fsck-statefs is refused
    even with ``force`` (EBUSY).
    """
    from statefsd.storage.blockdev import FileDevice
    from statefsd.storage.format import MIN_IMAGE_BYTES

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InvalidArgument(f"cannot create {path}: directory {parent} does not exist",
                              hint=f"create it first with mkdir -p {parent}, or choose another path")
    if os.path.isdir(path):
        raise InvalidArgument(f"{path} is a directory",
                              hint="give the path of an image file inside it, or a block device")
    exists = os.path.exists(path)
    is_block = exists and stat.S_ISBLK(os.stat(path).st_mode)
    if is_block and size is not None:
        raise UsageError("--size does not apply to a block device",
                         hint="drop --size; a block device is formatted at its own size")
    if not exists and size is None:
        raise UsageError(f"{path} does not exist",
                         hint="give --size to create an image file, e.g. --size 64M")
    if size is not None and size < MIN_IMAGE_BYTES:
        raise UsageError(f"an image of {size} bytes is too small; StateFS needs at least "
                         f"{MIN_IMAGE_BYTES >> 20} MiB",
                         hint=f"give a bigger --size, e.g. --size {max(64, MIN_IMAGE_BYTES >> 20)}M")
    if not exists:
        return False
    with FileDevice(path) as device:  # the lock refuses an image in use (EBUSY)
        found = "" if force else _what_it_holds(path, device)
        small = size is None and device.size < MIN_IMAGE_BYTES
    if found:
        raise UsageError(f"{path} already holds {found}; formatting would destroy it",
                         hint="check the path; add --force to overwrite it anyway")
    if small:
        raise UsageError(f"{path} has {os.path.getsize(path) if not is_block else device.size} bytes; "
                         f"StateFS needs at least {MIN_IMAGE_BYTES >> 20} MiB",
                         hint="give a bigger --size to make it an image file of that size, e.g. --size 64M"
                         if not is_block else "use a bigger device")
    return True


def _what_it_holds(path: str, device) -> str:
    """Words for what is on the target, or '' when it is all zeros."""
    if _holds_statefs(device):
        return "a StateFS image"
    signature = _blkid_signature(path)
    if signature:
        return signature
    offset = _first_nonzero(device)
    if offset is not None:
        return f"data (a non-zero byte at offset {offset})"
    return ""


def _holds_statefs(device) -> bool:
    from statefsd.storage.format import SUPERBLOCK_MAGIC_END, SUPERBLOCK_OFFSETS, has_superblock_magic

    return any(has_superblock_magic(device.read(offset, SUPERBLOCK_MAGIC_END))
               for offset in SUPERBLOCK_OFFSETS if offset < device.size)


def _blkid_signature(path: str) -> str:
    """What ``blkid -p`` (util-linux) recognizes on ``path``, e.g. 'an ext4
    file system'; '' when it finds nothing or is not installed (the zero
    scan still guards the target then)."""
    import shutil
    import subprocess

    blkid = shutil.which("blkid") or next(
        (p for p in ("/usr/sbin/blkid", "/sbin/blkid") if os.access(p, os.X_OK)), None)
    if blkid is None:
        return ""
    try:
        probe = subprocess.run([blkid, "-p", "-o", "export", path], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if probe.returncode != 0:  # 2: nothing found
        return ""
    fields = dict(line.split("=", 1) for line in probe.stdout.splitlines() if "=" in line)
    if "PTTYPE" in fields and "TYPE" not in fields:
        return f"a partition table ({fields['PTTYPE']})"
    kind = fields.get("TYPE", "unknown")
    if kind == "crypto_LUKS":
        return "a LUKS encrypted volume"
    usage = {"filesystem": "file system", "crypto": "encrypted volume", "raid": "RAID member"}
    return f"a{'n' if kind[:1] in 'aeiou' else ''} {kind} {usage.get(fields.get('USAGE', ''), 'signature')}"


def _first_nonzero(device) -> int | None:
    """Offset of the first non-zero byte, or None. Reads every byte (also a
    tail shorter than a sector, which the device interface hides) through
    the buffered descriptor; holes of a sparse file are skipped."""
    chunk = 1 << 20
    zeros = bytes(chunk)
    size = os.lseek(device.fd, 0, os.SEEK_END)
    if size <= _SCAN_ALL_BYTES:
        ranges = _data_ranges(device.fd, size)
    else:
        ranges = [(0, _SCAN_EDGE_BYTES), (size - _SCAN_EDGE_BYTES, size)]
    for start, end in ranges:
        for offset in range(start, end, chunk):
            try:
                data = os.pread(device.fd, min(chunk, end - offset), offset)
            except OSError as exc:
                raise DeviceIOError(f"{device.path}: read at {offset}: {exc.strerror}") from None
            if data != zeros[:len(data)]:
                return offset + next(i for i, b in enumerate(data) if b)
    return None


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The extents that hold data (SEEK_DATA/SEEK_HOLE where the file system
    supports them; otherwise everything)."""
    ranges, offset = [], 0
    try:
        while offset < size:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            ranges.append((start, end))
            offset = end
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data past offset
            return ranges
        return [(0, size)]
    return ranges


# -------------------------------------------------------- daemon commands

def _client(args: argparse.Namespace):
    from statefsd.client import Client

    return Client(getattr(args, "socket", None))


def cmd_put(args: argparse.Namespace) -> int:
    if (args.value is None) == (args.file is None):
        raise UsageError("give the value as an argument, as - for stdin, or with --file (exactly one)")
    if args.file is not None:
        value = _read_file(args.file)
    elif args.value == "-":
        value = sys.stdin.buffer.read()
    else:
        value = os.fsencode(args.value)  # the exact bytes the shell passed
    with _client(args) as client:
        txn = client.put(args.key, value)
    return _report_write(args, txn, f"put {args.key} ({len(value)} bytes)")


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        value = client.get(args.key)
    if args.output is not None:
        _write_file(args.output, value)
        return 0
    sys.stdout.buffer.write(value)
    sys.stdout.buffer.flush()
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        txn = client.delete(args.key)
    return _report_write(args, txn, f"removed {args.key}")


def _report_write(args: argparse.Namespace, txn: int | None, what: str) -> int:
    """Silence on success, unless asked: --json for scripts, -v for people."""
    if args.json:
        print(json.dumps({"txn": txn}))
    elif args.verbose:
        print(f"statefs: {what}: committed as transaction {txn}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        keys = client.list(args.prefix)
        stats = [client.stat(key) for key in keys] if args.long else None
    if args.json:
        print(json.dumps(stats if args.long else keys, ensure_ascii=False))
    elif args.long:
        width = max((len(str(st["size"])) for st in stats), default=1)
        tid = max((len(str(st["txn_id"])) for st in stats), default=1)
        end = "\0" if args.null else "\n"
        for st in stats:
            sys.stdout.write(f"{st['size']:>{width}} {st['txn_id']:>{tid}} {st['path']}{end}")
    else:
        end = "\0" if args.null else "\n"
        sys.stdout.write("".join(key + end for key in keys))
    sys.stdout.flush()
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.stat(args.key) if args.key is not None else client.info()
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    elif args.key is not None:
        print(_key_stat_text(result))
    else:
        print(_info_text(result))
    return 0


def _key_stat_text(st: dict) -> str:
    return (f"key:  {st['path']}\n"
            f"size: {st['size']} bytes\n"
            f"txn:  {st['txn_id']} (the transaction that last wrote it)")


def _info_text(info: dict) -> str:
    """The daemon's info in words. Field names of the JSON form are the
    protocol's; here each line says what the number means."""
    replay = info.get("replay") or {}
    mode = "read-only" if info.get("read_only") else "read-write"
    lines = [
        f"image:         {info['image']} ({_human(info['device_bytes'])}, format {info['format']}, "
        f"encryption {info['encryption']}, {mode})",
        f"keys:          {info['keys']} ({_human(info['live_bytes'])} of values)",
        f"log:           {_human(info['log_used'])} used of {_human(info['log_size'])} "
        f"(the active half of the device; the other half receives compaction)",
        f"next txn id:   {info['next_txn_id']} (ids only grow; they are reserved on disk in "
        f"batches, so a restart skips ahead)",
    ]
    if replay:
        lines.append(f"at mount:      replayed {replay.get('committed_txns', 0)} committed transactions, "
                     f"highest id {replay.get('max_txn_id', 0)}, log ended at byte "
                     f"{replay.get('log_end', 0)} of the device")
    lines.append(f"uuid:          {info['device_uuid']}, superblock generation {info['generation']}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def cmd_compact(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.compact()
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            verdict = client.verify()
    except StateFSError as exc:
        _fail(exc)
        return FsckExit.OPERATIONAL
    print(json.dumps(verdict, indent=2, sort_keys=True) if args.json else _verify_text(verdict))
    return FsckExit.UNCORRECTED if verdict.get("findings") else FsckExit.CLEAN


def _verify_text(v: dict) -> str:
    """The verify map in words (the JSON form has the protocol's names)."""
    signed = (f"{v['verified_checkpoints']} of {v['checkpoints']} signatures verified"
              if v["verified_checkpoints"] or not v["checkpoints"] else
              f"{v['checkpoints']} found, signatures not checked (statefsd runs without --keystore-socket)")
    last = f", the last at byte {v['last_checkpoint_offset']}" if v["last_checkpoint_offset"] >= 0 else ""
    lines = [
        f"verified:      {_human(v['scanned_bytes'])} of log (epoch {v['log_epoch']}) up to byte "
        f"{v['position']} in {v['seconds']} s, while statefsd kept serving",
        f"records:       {v['records']} ({v['committed_txns']} committed transactions)",
        f"chain head:    {v['chain_head'] or '-'} "
        f"({'matches' if v['chain_head_matches'] else 'does NOT match'} the daemon's)",
        f"checkpoints:   {signed}{last}",
    ]
    findings, first = v.get("findings") or {}, v.get("first_finding")
    if not findings:
        lines.append("findings:      none")
        return "\n".join(lines)
    lines.append("findings:      " + ", ".join(f"{kind} {n}" for kind, n in sorted(findings.items())))
    if first:
        lines.append(f"first:         {first['kind']} at byte offset {first['offset']}: {first['reason']}")
    if set(findings) == {"repairable-sector"}:
        lines.append("next:          restart statefsd: a read-write mount writes the rebuilt sectors back")
    else:
        lines.append("next:          stop statefsd and run fsck-statefs on the image; it says what "
                     "--repair can do")
    return "\n".join(lines)


def cmd_txn(args: argparse.Namespace) -> int:
    raw = sys.stdin.buffer.read() if args.file == "-" else _read_file(args.file)
    ops, expect = parse_txn_json(raw)
    with _client(args) as client:
        with client.transaction() as txn:
            for kind, key, value in ops:
                if kind == "put":
                    txn.put(key, value)
                else:
                    txn.delete(key)
            txn.commit(expect=expect)
    return _report_write(args, txn.txn_id, f"applied {len(ops)} ops")


TXN_FORMAT_HINT = "the format is in 'statefs txn --help'"


def parse_txn_json(raw: bytes) -> tuple[list[tuple[str, str, bytes]], list[tuple[str, int]]]:
    """The txn command's JSON document -> ([(kind, key, value)], [(key, txn)]);
    EINVAL naming the first problem."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"transaction is not valid JSON: {exc}", hint=TXN_FORMAT_HINT) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ops"), list):
        raise InvalidArgument('transaction JSON must be an object {"ops": [...]}', hint=TXN_FORMAT_HINT)
    if not doc["ops"]:
        raise InvalidArgument("transaction has no ops", hint=TXN_FORMAT_HINT)
    ops = []
    for i, op in enumerate(doc["ops"]):
        where = f"ops[{i}]"
        if not isinstance(op, dict) or op.get("op") not in ("put", "delete"):
            raise InvalidArgument(f'{where} must be an object with "op": "put" or "delete"', hint=TXN_FORMAT_HINT)
        key = op.get("key")
        if not isinstance(key, str):
            raise InvalidArgument(f'{where} needs a string "key"', hint=TXN_FORMAT_HINT)
        if op["op"] == "delete":
            ops.append(("delete", key, b""))
            continue
        if ("value" in op) == ("value_b64" in op):
            raise InvalidArgument(f'{where} needs exactly one of "value" and "value_b64"', hint=TXN_FORMAT_HINT)
        if "value" in op:
            if not isinstance(op["value"], str):
                raise InvalidArgument(f'{where} "value" must be a string (use "value_b64" for bytes)', hint=TXN_FORMAT_HINT)
            try:
                value = op["value"].encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f'{where} "value" is not valid Unicode text', hint=TXN_FORMAT_HINT) from None
        else:
            try:
                value = base64.b64decode(op["value_b64"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise InvalidArgument(f'{where} "value_b64" is not valid base64', hint=TXN_FORMAT_HINT) from None
        ops.append(("put", key, value))
    return ops, _txn_expect(doc.get("expect", []))


def _txn_expect(expect: object) -> list[tuple[str, int]]:
    if not isinstance(expect, list):
        raise InvalidArgument('"expect" must be an array of {"key": ..., "txn": ...}', hint=TXN_FORMAT_HINT)
    conditions = []
    for i, condition in enumerate(expect):
        if (not isinstance(condition, dict) or not isinstance(condition.get("key"), str)
                or type(condition.get("txn")) is not int):
            raise InvalidArgument(f'expect[{i}] must be an object with a string "key" and an integer "txn"',
                                  hint=TXN_FORMAT_HINT)
        conditions.append((condition["key"], condition["txn"]))
    return conditions


def _write_file(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise InvalidArgument(f"cannot write {path}: {exc.strerror}",
                              hint="check the path and the directory's permissions") from None


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}", hint="check the file's path") from None


COMMANDS = {
    "mkfs": cmd_mkfs, "put": cmd_put, "get": cmd_get, "rm": cmd_rm,
    "ls": cmd_ls, "txn": cmd_txn, "stat": cmd_stat, "compact": cmd_compact,
    "verify": cmd_verify, "vault": vault_cli.run,
    "replicate": replica_cli.run, "peer": replica_cli.run, "remote": replica_cli.run, "restore": replica_cli.run,
}


if __name__ == "__main__":
    sys.exit(main())
