"""statefs: the command line for StateFS.

    statefs mkfs IMAGE --size 64M [--encryption on|off] [--redundancy parity|off] [--force]
    statefs [--socket PATH] put KEY VALUE | put KEY --file F | put KEY -
    statefs [--socket PATH] get KEY          (raw value bytes on stdout)
    statefs [--socket PATH] rm KEY
    statefs [--socket PATH] ls [PREFIX]
    statefs [--socket PATH] txn [FILE|-]     (JSON, see below)
    statefs [--socket PATH] stat [KEY]       (key stat, or daemon info, as JSON)

txn JSON: {"ops": [{"op": "put", "key": K, "value": TEXT},
                   {"op": "put", "key": K, "value_b64": BASE64},
                   {"op": "delete", "key": K}]}

The socket comes from --socket or $STATEFS_SOCKET. Failures print
``statefs: <NAME>: message (hint)`` on stderr and exit with the numeric
code of errors.Code; argparse usage errors exit 2 (EUSAGE).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import stat
import sys

from statefsd.errors import InternalError, InvalidArgument, StateFSError, UsageError


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
    p.add_argument("--size", help="create (zero-filled) an image file of this size, e.g. 64M")
    p.add_argument("--encryption", choices=("on", "off"),
                   default=os.environ.get("STATEFS_ENCRYPTION", "off"),
                   help="encrypt values at rest (default: $STATEFS_ENCRYPTION or off)")
    p.add_argument("--redundancy", choices=("parity", "off"), default="parity",
                   help="parity (default): a parity trailer after every write group rebuilds any one "
                        "damaged sector of it; off: damage is detected, not repaired")
    p.add_argument("--force", action="store_true", help="overwrite an existing StateFS image")

    p = sub.add_parser("put", parents=[common], help="store a value")
    p.add_argument("key")
    p.add_argument("value", nargs="?", help="the value as text, or - to read stdin")
    p.add_argument("--file", help="read the value from this file")

    for name, text in (("get", "print a value's raw bytes"), ("rm", "delete a key")):
        sub.add_parser(name, parents=[common], help=text).add_argument("key")

    p = sub.add_parser("ls", parents=[common], help="list keys")
    p.add_argument("prefix", nargs="?", default="")

    p = sub.add_parser("txn", parents=[common], help="apply a JSON transaction atomically")
    p.add_argument("file", nargs="?", default="-", help="JSON file, or - for stdin (default)")

    p = sub.add_parser("stat", parents=[common], help="a key's stat, or the daemon's info")
    p.add_argument("key", nargs="?")

    sub.add_parser("compact", parents=[common], help="compact the log now")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    from statefsd.blockdev import FileDevice, create_image, parse_size
    from statefsd.engine import Engine

    path = args.image
    exists = os.path.exists(path)
    is_block = exists and stat.S_ISBLK(os.stat(path).st_mode)
    if exists:
        with FileDevice(path) as device:  # the lock refuses an image in use
            if not args.force and _holds_statefs(device):
                raise UsageError(f"{path} already holds a StateFS image; add --force to overwrite it")
    if is_block:
        if args.size:
            raise UsageError("--size does not apply to a block device")
    elif args.size:
        create_image(path, parse_size(args.size))
    elif not exists:
        raise UsageError(f"{path} does not exist; give --size to create it")
    with FileDevice(path) as device:
        Engine.mkfs(device, encryption=args.encryption, redundancy=args.redundancy)
        size = device.size
    print(f"statefs: formatted {path}: {size} bytes, encryption {args.encryption}, "
          f"redundancy {args.redundancy}")
    return 0


def _holds_statefs(device) -> bool:
    from statefsd.format import SUPERBLOCK_MAGIC, SUPERBLOCK_OFFSETS

    return any(device.read(offset, len(SUPERBLOCK_MAGIC)) == SUPERBLOCK_MAGIC
               for offset in SUPERBLOCK_OFFSETS if offset < device.size)


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
        client.put(args.key, value)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        value = client.get(args.key)
    sys.stdout.buffer.write(value)
    sys.stdout.buffer.flush()
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.key)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        keys = client.list(args.prefix)
    for key in keys:
        print(key)
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.stat(args.key) if args.key is not None else client.info()
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.compact()
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_txn(args: argparse.Namespace) -> int:
    raw = sys.stdin.buffer.read() if args.file == "-" else _read_file(args.file)
    ops = parse_txn_json(raw)
    with _client(args) as client:
        with client.transaction() as txn:
            for kind, key, value in ops:
                if kind == "put":
                    txn.put(key, value)
                else:
                    txn.delete(key)
    return 0


def parse_txn_json(raw: bytes) -> list[tuple[str, str, bytes]]:
    """The txn command's JSON document -> [(kind, key, value)]; EINVAL naming
    the first problem."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"transaction is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ops"), list):
        raise InvalidArgument('transaction JSON must be an object {"ops": [...]}')
    if not doc["ops"]:
        raise InvalidArgument("transaction has no ops")
    ops = []
    for i, op in enumerate(doc["ops"]):
        where = f"ops[{i}]"
        if not isinstance(op, dict) or op.get("op") not in ("put", "delete"):
            raise InvalidArgument(f'{where} must be an object with "op": "put" or "delete"')
        key = op.get("key")
        if not isinstance(key, str):
            raise InvalidArgument(f'{where} needs a string "key"')
        if op["op"] == "delete":
            ops.append(("delete", key, b""))
            continue
        if ("value" in op) == ("value_b64" in op):
            raise InvalidArgument(f'{where} needs exactly one of "value" and "value_b64"')
        if "value" in op:
            if not isinstance(op["value"], str):
                raise InvalidArgument(f'{where} "value" must be a string (use "value_b64" for bytes)')
            try:
                value = op["value"].encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f'{where} "value" is not valid Unicode text') from None
        else:
            try:
                value = base64.b64decode(op["value_b64"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise InvalidArgument(f'{where} "value_b64" is not valid base64') from None
        ops.append(("put", key, value))
    return ops


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from None


COMMANDS = {
    "mkfs": cmd_mkfs, "put": cmd_put, "get": cmd_get, "rm": cmd_rm,
    "ls": cmd_ls, "txn": cmd_txn, "stat": cmd_stat, "compact": cmd_compact,
}


if __name__ == "__main__":
    sys.exit(main())
