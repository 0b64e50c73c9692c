"""Remotes: untrusted stores (SFTP, WebDAV, S3 ...) that hold a copy of the
outbox, carried there by rclone (statefsd/replica/rclone.py).

A remote is a section of StateFS's own rclone.conf in the replica state
dir: ``[NAME]`` is an rclone ``alias`` of the spec the user gave (a
connection string such as ``:sftp,host=...,key_file=...,
known_hosts_file=...:path``, or ``section:path`` of a section already in
that file), so every later run addresses it as ``NAME:``.

Push order is what keeps a remote consistent at every instant: the key
file, then new segments, then heads (a head never arrives before the
segments it lists), and only then the deletion of what the newest local
head, signed by this device, retires (old segments and older heads). A remote never loses a
file for any other reason.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import re
import time
from pathlib import Path

from statefsd.errors import IntegrityError, InvalidArgument, NotFound, StateFSError
from statefsd.replica import format as rfmt
from statefsd.replica.rclone import CONFIG_FILE, Rclone, join, local_files, redact
from statefsd.replica.verify import read_heads

PUSHES_FILE = "remote-pushes.json"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


# ---------------------------------------------------------------- replica files

def _head_counter(rel: str) -> int | None:
    parsed = rfmt.parse_head_name(rel)
    return parsed[1] if parsed else None


def replica_files(sizes: dict[str, int]) -> dict[str, int]:
    """The entries of ``sizes`` that are replica files (key file, segments,
    heads); anything else (a writer's temporary file, an engine's partial
    upload) is neither pushed nor pulled."""
    return {rel: size for rel, size in sizes.items()
            if rel == rfmt.KEYS_FILE or rfmt.is_segment_name(rel) or _head_counter(rel) is not None}


def retired_files(outbox: str | os.PathLike) -> list[str]:
    """What the newest head of ``outbox`` retires (old segments and older
    heads): the only files a push deletes on a remote. The head's signature
    is checked; an outbox with heads of several signers retires nothing
    (it is not one device's outbox), and nothing the head lists as live is
    ever returned."""
    heads = read_heads(Path(outbox), [])
    if not heads or len({h.signer for h in heads}) > 1:
        return []
    newest = heads[-1]
    live = {seg.name for seg in newest.segments} | {rfmt.head_name(newest.signer, newest.counter)}
    return [name for name in newest.retired if name not in live]


# ---------------------------------------------------------------- configuration

def config_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / CONFIG_FILE


def remote_of(remote: str) -> str:
    """The rclone remote string of a configured remote's name (names hold
    no ':'); an rclone remote string is returned as it is."""
    return remote if ":" in remote else f"{remote}:"


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


def remove_remote(rclone: Rclone, name: str, state_dir: str | os.PathLike) -> None:
    """Forget the remote (its files stay where they are). ``rclone`` is
    not run: nothing on the remote changes."""
    parser = _read_config(state_dir)
    if name not in remote_names(state_dir):
        raise NotFound(f"no remote named {name!r}", hint="list remotes with 'statefs remote ls'")
    parser.remove_section(name)
    _write_config(state_dir, parser)
    pushes = _read_pushes(state_dir)
    if pushes.pop(remote_of(name), None) is not None:
        _write_pushes(state_dir, pushes)


# ---------------------------------------------------------------- push / pull

def push(rclone: Rclone, outbox: str | os.PathLike, remote: str, *,
         state_dir: str | os.PathLike | None = None) -> dict:
    """Bring ``remote`` (a remote's name, or an rclone remote string) up to
    date with ``outbox``: key file, new segments, heads last, then delete
    what the newest local head retires. Resumable: run it again after any
    failure. Nothing local is changed. The push is recorded for
    :func:`remote_status` in ``state_dir`` (default: beside rclone.conf)."""
    remote = remote_of(remote)
    local = replica_files(local_files(outbox))
    uploaded: list[str] = []
    there = {f.path: f.size for f in rclone.list(remote)}
    if rfmt.KEYS_FILE in local and _keys_differ(rclone, outbox, remote, there):
        rclone.put(Path(outbox) / rfmt.KEYS_FILE, join(remote, rfmt.KEYS_FILE))
        uploaded.append(rfmt.KEYS_FILE)
    heads = [rel for rel in local if _head_counter(rel) is not None]
    uploaded += rclone.copy_up(outbox, remote, [rel for rel in local if rfmt.is_segment_name(rel)],
                               present=there)
    uploaded += rclone.copy_up(outbox, remote, heads, present=there)
    report = {"remote": redact(remote), "uploaded": uploaded, "files": len(uploaded),
              "bytes": sum(local[rel] for rel in uploaded),
              "deleted": rclone.delete(remote, retired_files(outbox)),
              "head_counter": max((_head_counter(rel) for rel in heads), default=0), "time": time.time()}
    pushes = _read_pushes(state_dir or rclone.config_path.parent)
    pushes[redact(remote)] = {k: report[k] for k in ("time", "head_counter", "files", "bytes")}
    _write_pushes(state_dir or rclone.config_path.parent, pushes)
    return report


def _keys_differ(rclone: Rclone, outbox: str | os.PathLike, remote: str, there: dict[str, int]) -> bool:
    """The key file may be rewritten (a new device, a new passphrase slot),
    so it is compared by content, not only by name and size."""
    mine = (Path(outbox) / rfmt.KEYS_FILE).read_bytes()
    if there.get(rfmt.KEYS_FILE) != len(mine):
        return True
    return rclone.cat(join(remote, rfmt.KEYS_FILE)) != mine


def pull(rclone: Rclone, remote: str, local_dir: str | os.PathLike) -> list[str]:
    """Fetch into ``local_dir`` every replica file of ``remote`` (a name or
    an rclone remote string) that it lacks (key file, segments, heads: what
    a restore reads); return the paths fetched. The caller verifies the
    copy (verify_copy) before trusting it."""
    remote = remote_of(remote)
    wanted = replica_files({f.path: f.size for f in rclone.list(remote)})
    return rclone.copy_down(remote, local_dir, include=sorted(wanted))


HEADS_READ = 8   # newest heads status reads before it gives up finding a valid one


def remote_status(rclone: Rclone, remote: str, state_dir: str | os.PathLike | None = None, *,
                  signer: bytes | None = None) -> dict:
    """What ``remote`` holds now, or why it cannot be reached (never
    raises for that), and what the last push to it recorded.

    ``head_counter`` and ``head_digest`` are those of the newest head whose
    signature verifies (signed by ``signer`` if given): a forged or damaged
    head on an untrusted store is reported in ``problems`` and cannot fake
    a newer history."""
    remote = remote_of(remote)
    status: dict = {"name": redact(remote.removesuffix(":")), "remote": redact(remote), "reachable": False,
                    "error": None, "hint": None, "head_counter": 0, "head_digest": None, "signer": None,
                    "files": 0, "bytes": 0, "segments": 0, "heads": 0, "problems": [],
                    "last_push": _read_pushes(state_dir or rclone.config_path.parent).get(redact(remote))}
    try:
        held = replica_files({f.path: f.size for f in rclone.list(remote)})
        heads = sorted((rel for rel in held if _head_counter(rel) is not None), key=_head_counter, reverse=True)
        status.update(files=len(held), bytes=sum(held.values()), heads=len(heads),
                      segments=sum(1 for rel in held if rfmt.is_segment_name(rel)))
        for rel in heads[:HEADS_READ]:
            head = _remote_head(rclone, remote, rel, signer, status["problems"])
            if head is not None:
                status.update(head_counter=head.counter, head_digest=rfmt.file_digest(head.body).hex(),
                              signer=head.signer.hex())
                break
    except StateFSError as exc:
        status.update(error=f"{exc.code.name}: {exc.message}", hint=exc.hint, code=exc.code.name)
        return status
    status["reachable"] = True
    return status


def _remote_head(rclone: Rclone, remote: str, rel: str, signer: bytes | None,
                 problems: list[str]) -> rfmt.Head | None:
    try:
        head = rfmt.decode_head_file(rclone.cat(join(remote, rel)), rel)
    except IntegrityError as exc:
        problems.append(f"{rel}: {exc.message}")
        return None
    if rfmt.head_name(head.signer, head.counter) != rel:
        problems.append(f"{rel}: the file name does not match the head it holds (counter {head.counter})")
        return None
    if signer is not None and head.signer != signer:
        problems.append(f"{rel}: signed by {rfmt.device_tag(head.signer)}, not by this device")
        return None
    return head


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
