"""Remotes: untrusted stores (SFTP, WebDAV, S3 ...) that hold a copy of the
outbox, carried there by rclone (statefsd/replica/rclone.py).

A remote is a section of StateFS's own rclone.conf in the replica state
dir: ``[NAME]`` is an rclone ``alias`` of the spec the user gave (a
connection string such as ``:sftp,host=...,key_file=...,
known_hosts_file=...:path``, or ``section:path`` of a section already in
that file), so every later run addresses it as ``NAME:``.

Push order is what keeps a remote consistent at every instant: the key
file, then new segments, then heads (a head never arrives before the
segments it lists), and only then the deletion of the segments that the
newest local head, signed by this device, retires. A remote never loses a
file for any other reason.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from statefsd.errors import InvalidArgument, NotFound, StateFSError
from statefsd.replica.rclone import Rclone, join, local_files, redact

CONFIG_FILE = "rclone.conf"
PUSHES_FILE = "remote-pushes.json"
KEYS_FILE = "keys.sfk"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


# ---------------------------------------------------------------- replica names
# TODO(format): the names belong to statefsd.replica.format; use its
# is_segment_name/parse_head_name once it is on this branch.

_SEGMENT_NAME = re.compile(r"^seg/[0-9a-f]{32}\.sfs$")
_HEAD_NAME = re.compile(r"^head/([0-9a-f]{16})-([0-9a-f]{16})\.sfh$")


def _is_segment(rel: str) -> bool:
    return bool(_SEGMENT_NAME.match(rel))


def _head_counter(rel: str) -> int | None:
    m = _HEAD_NAME.match(rel)
    return int(m.group(2), 16) if m else None


def replica_files(sizes: dict[str, int]) -> dict[str, int]:
    """The entries of ``sizes`` that are replica files (key file, segments,
    heads); anything else (a writer's temporary file, an engine's partial
    upload) is neither pushed nor pulled."""
    return {rel: size for rel, size in sizes.items()
            if rel == KEYS_FILE or _is_segment(rel) or _head_counter(rel) is not None}


def retired_segments(outbox: str | os.PathLike) -> list[str]:
    """The segment paths the newest head of ``outbox`` retires (the only
    files a push deletes on a remote).

    TODO(format): read the newest head with statefsd.replica.format
    (decode_head_file, checking its signature) and return its retired
    list; until then no segment is ever deleted."""
    return []


# ---------------------------------------------------------------- configuration

def config_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / CONFIG_FILE


def remote_of(name: str) -> str:
    """The rclone remote string of a configured remote."""
    return f"{name}:"


def _read_config(state_dir: str | os.PathLike) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(interpolation=None)
    parser.optionxform = str  # rclone keys are case-sensitive
    path = config_path(state_dir)
    if path.exists():
        parser.read(path, encoding="utf-8")
    return parser


def _write_config(state_dir: str | os.PathLike, parser: configparser.RawConfigParser) -> None:
    """Atomically, mode 0600: the file may hold obscured (not encrypted)
    passwords."""
    path = config_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    parser.write(text)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remote_names(state_dir: str | os.PathLike) -> list[str]:
    """The remotes added with :func:`add_remote`."""
    parser = _read_config(state_dir)
    return sorted(s for s in parser.sections() if parser.get(s, "statefs_remote", fallback="") == "1")


def check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise InvalidArgument(f"remote name {name!r} is not valid",
                              hint="use 1-63 letters, digits, '-' or '_', starting with a letter or digit")


def parse_connection_string(spec: str) -> tuple[str, dict[str, str], str]:
    """``:backend,key=value,...:path`` -> (backend, options, path). Values
    holding ',' or ':' are quoted with ' or " (a doubled quote inside stands
    for one), as rclone reads them."""
    if not spec.startswith(":"):
        raise InvalidArgument(f"{redact(spec)!r} is not a connection string", hint=_SPEC_FORMS)
    pos, n = 1, len(spec)
    parts: list[str] = []
    current = ""
    while pos < n:
        ch = spec[pos]
        if ch in "'\"" and current.endswith("="):
            end = pos + 1
            value = ""
            while True:
                close = spec.find(ch, end)
                if close < 0:
                    raise InvalidArgument(f"unclosed quote in {redact(spec)!r}", hint=_SPEC_FORMS)
                value += spec[end:close]
                if spec.startswith(ch, close + 1):   # doubled quote
                    value += ch
                    end = close + 2
                    continue
                pos = close + 1
                break
            current += value
            continue
        if ch in ",:":
            parts.append(current)
            current = ""
            if ch == ":":
                backend, options = parts[0], {}
                for item in parts[1:]:
                    key, eq, value = item.partition("=")
                    options[key.strip()] = value if eq else "true"
                if not backend:
                    break
                return backend, options, spec[pos + 1:]
            pos += 1
            continue
        current += ch
        pos += 1
    raise InvalidArgument(f"remote spec {redact(spec)!r} has no backend or no ':path' part",
                          hint="end the connection string with ':path' (':' alone for the top directory); "
                               + _SPEC_FORMS)


_SPEC_FORMS = ("give 'section:path' (a section of StateFS's rclone.conf) or a connection string "
               "':sftp,host=HOST,user=USER,key_file=KEY,known_hosts_file=KNOWN_HOSTS:path' "
               "(quote values holding ':' or ',')")


def check_spec(spec: str, state_dir: str | os.PathLike) -> None:
    """A spec is ``:backend,option=value,...:path`` or ``section:path``
    with the section in StateFS's rclone.conf. An SFTP remote must
    authenticate both ways: a client key, and the server's host key pinned
    in a known_hosts file (without one rclone accepts any host key)."""
    if not spec or "\n" in spec or "\r" in spec:
        raise InvalidArgument("the remote spec is empty or spans lines", hint=_SPEC_FORMS)
    if spec.startswith(":"):
        backend, options, _ = parse_connection_string(spec)
    else:
        section, sep, _ = spec.partition(":")
        if not sep or not section:
            raise InvalidArgument(f"remote spec {redact(spec)!r} is not an rclone remote", hint=_SPEC_FORMS)
        parser = _read_config(state_dir)
        if not parser.has_section(section):
            raise InvalidArgument(f"section {section!r} is not in {config_path(state_dir)}",
                                  hint=f"add it there with 'rclone --config {config_path(state_dir)} config', "
                                       "or " + _SPEC_FORMS)
        options = dict(parser.items(section))
        backend = options.get("type", "")
    if backend == "sftp":
        if not options.get("known_hosts_file"):
            raise InvalidArgument(f"SFTP remote {redact(spec)!r} does not pin the server's host key",
                                  hint="add known_hosts_file=FILE with the server's key "
                                       "(ssh-keyscan -p PORT HOST > FILE, checked out of band)")
        if not any(options.get(k) for k in ("key_file", "key_pem", "key_use_agent")):
            raise InvalidArgument(f"SFTP remote {redact(spec)!r} has no client key",
                                  hint="add key_file=PRIVATE_KEY (its public key in the server's "
                                       "authorized_keys)")


def add_remote(rclone: Rclone, name: str, spec: str, state_dir: str | os.PathLike) -> str:
    """Check ``spec`` and that the remote answers (credentials, pinned
    host key), create its directory, and store it as ``[name]``; return the
    remote string (``name:``) for push, pull and status."""
    check_name(name)
    check_spec(spec, state_dir)
    parser = _read_config(state_dir)
    if parser.has_section(name):
        raise InvalidArgument(f"a remote or rclone section named {name!r} exists already",
                              hint=f"remove it first ('statefs remote rm {name}') or pick another name")
    rclone.check_reachable(spec)
    rclone.mkdir(spec)
    parser.add_section(name)
    parser.set(name, "type", "alias")
    parser.set(name, "remote", spec)
    parser.set(name, "statefs_remote", "1")
    _write_config(state_dir, parser)
    return remote_of(name)


def remove_remote(name: str, state_dir: str | os.PathLike) -> None:
    """Forget the remote (its files stay where they are)."""
    parser = _read_config(state_dir)
    if name not in remote_names(state_dir):
        raise NotFound(f"no remote named {name!r}", hint="list remotes with 'statefs remote ls'")
    parser.remove_section(name)
    _write_config(state_dir, parser)
    pushes = _read_pushes(state_dir)
    if pushes.pop(remote_of(name), None) is not None:
        _write_pushes(state_dir, pushes)


# ---------------------------------------------------------------- push / pull

@dataclass
class PushReport:
    remote: str
    uploaded: list[str] = field(default_factory=list)
    bytes: int = 0
    deleted: list[str] = field(default_factory=list)
    head_counter: int = 0       # newest head on the remote after the push


def push(rclone: Rclone, outbox: str | os.PathLike, remote: str, *,
         state_dir: str | os.PathLike | None = None) -> PushReport:
    """Bring ``remote`` up to date with ``outbox``: key file, new segments,
    heads last, then delete the segments the newest local head retires.
    Resumable: run it again after any failure. Nothing local is changed;
    with ``state_dir`` the push is recorded for :func:`remote_status`."""
    local = replica_files(local_files(outbox))
    report = PushReport(remote)
    if KEYS_FILE in local and _keys_differ(rclone, outbox, remote, local[KEYS_FILE]):
        rclone.put(Path(outbox) / KEYS_FILE, join(remote, KEYS_FILE))
        report.uploaded.append(KEYS_FILE)
    segments = [rel for rel in local if _is_segment(rel)]
    heads = [rel for rel in local if _head_counter(rel) is not None]
    report.uploaded += rclone.copy_up(outbox, remote, segments)
    report.uploaded += rclone.copy_up(outbox, remote, heads)
    report.bytes = sum(local[rel] for rel in report.uploaded)
    report.deleted = rclone.delete(remote, retired_segments(outbox))
    report.head_counter = max((_head_counter(rel) for rel in heads), default=0)
    if state_dir is not None:
        pushes = _read_pushes(state_dir)
        pushes[remote] = {"time": time.time(), "head_counter": report.head_counter,
                          "files": len(report.uploaded), "bytes": report.bytes}
        _write_pushes(state_dir, pushes)
    return report


def _keys_differ(rclone: Rclone, outbox: str | os.PathLike, remote: str, size: int) -> bool:
    """The key file may be rewritten (a new device, a new passphrase slot),
    so it is compared by content, not only by name."""
    there = {f.path: f.size for f in rclone.list(remote) if f.path == KEYS_FILE}
    if there.get(KEYS_FILE) != size:
        return True
    return rclone.cat(join(remote, KEYS_FILE)) != (Path(outbox) / KEYS_FILE).read_bytes()


def pull(rclone: Rclone, remote: str, local_dir: str | os.PathLike) -> list[str]:
    """Fetch into ``local_dir`` every replica file of ``remote`` it lacks
    (key file, segments, heads: what a restore reads); return the paths
    fetched. Files are verified afterwards by the caller (verify_copy)."""
    wanted = replica_files({f.path: f.size for f in rclone.list(remote)})
    return rclone.copy_down(remote, local_dir, include=sorted(wanted))


def remote_status(rclone: Rclone, remote: str, *, state_dir: str | os.PathLike | None = None) -> dict:
    """What the remote holds now (or why it cannot be reached) and what the
    last push recorded. Never raises for an unreachable remote."""
    status: dict = {"remote": redact(remote), "reachable": False, "error": None, "hint": None,
                    "head_counter": 0, "files": 0, "bytes": 0, "segments": 0, "heads": 0,
                    "last_push": None}
    if state_dir is not None:
        status["last_push"] = _read_pushes(state_dir).get(remote)
    try:
        held = replica_files({f.path: f.size for f in rclone.list(remote)})
    except StateFSError as exc:
        status.update(error=str(exc), hint=exc.hint, code=exc.code.name)
        return status
    counters = [c for c in (_head_counter(rel) for rel in held) if c is not None]
    status.update(reachable=True, files=len(held), bytes=sum(held.values()),
                  segments=sum(1 for rel in held if _is_segment(rel)), heads=len(counters),
                  head_counter=max(counters, default=0))
    return status


# ---------------------------------------------------------------- push records

def _read_pushes(state_dir: str | os.PathLike) -> dict:
    try:
        with open(Path(state_dir) / PUSHES_FILE, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError:
        return {}   # a damaged record only loses the "last push" column
    return data if isinstance(data, dict) else {}


def _write_pushes(state_dir: str | os.PathLike, pushes: dict) -> None:
    path = Path(state_dir) / PUSHES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(pushes, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
